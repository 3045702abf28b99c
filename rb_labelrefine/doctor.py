"""``rb-labelrefine doctor``: is the environment this package was installed into healthy?

One line per item -- a verdict, what was found, and where something is wrong the exact command
that repairs it::

    ok    torch            2.15.0+cu132; devices: cpu (2 threads)
    FAIL  robustbench      3 of its 60 installed files differ from its RECORD: robustbench/utils.py, ...
          repair: pip install --force-reinstall --no-deps robustbench==1.1.1

Verdicts: ``ok``; ``warn`` (works, but not as the README recommends); ``--`` (an optional part that
is not installed: the line says how to install it); ``FAIL`` (broken: exit status 1).  Exit 0 when
nothing failed.

The RobustBench check is the one that matters most: torchattacks' wheels carry an old copy of
``robustbench/`` that overwrites RobustBench's files when torchattacks is installed after it (pip
reports RobustBench as "already satisfied" afterwards), and in a virtual environment over a system
RobustBench that copy shadows the real one.  Each installed file is compared with the sha256 in
RobustBench's own ``RECORD`` (what pip wrote when it installed it), and the ``robustbench`` that
``import`` would find must be the distribution's.  Everything is read with ``importlib.metadata``;
nothing is installed or changed.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ._optional import ROBUSTBENCH_REPAIR, install_hint
from .compat.robustbench_files import damage_message, damage_text as _damage_text, robustbench_damage

__all__ = ["Item", "run_checks", "check_robustbench_files", "robustbench_damage", "damage_message", "format_items",
           "main"]

OK, WARN, ABSENT, FAIL = "ok", "warn", "--", "FAIL"


@dataclass
class Item:
    name: str
    verdict: str
    detail: str
    repair: Optional[str] = None


def _distribution(name: str):
    """``importlib.metadata.distribution(name)`` or ``None`` (tests replace this lookup)."""
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def _requirements(dist) -> dict:
    """``{normalised project name: specifier string}`` of a distribution's unconditional requirements."""
    out = {}
    for line in dist.requires or []:
        try:
            from packaging.requirements import Requirement
        except ImportError:   # packaging ships with pip/setuptools almost everywhere; else: not checked
            return {}
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def _satisfies(version: str, spec: str) -> Optional[bool]:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return None
    return SpecifierSet(spec).contains(version, prereleases=True)


# ----------------------------------------------------------------------------- RobustBench's files

def check_robustbench_files(dist=None) -> Item:
    dist = dist if dist is not None else _distribution("robustbench")
    if dist is None:
        return Item("robustbench", ABSENT, "not installed (extra [robustbench])", install_hint("robustbench"))
    d = robustbench_damage(dist)
    if d is None:
        n = sum(1 for f in dist.files or [] if f.hash is not None and str(f).startswith("robustbench/"))
        return Item("robustbench", OK, f"{dist.version}, its {n} installed files match its RECORD")
    return Item("robustbench", FAIL, f"{dist.version}: {_damage_text(d)}",
                ROBUSTBENCH_REPAIR.format(version=dist.version))


# ----------------------------------------------------------------------------- the other items

def check_torch() -> Item:
    try:
        import torch
    except Exception as exc:   # noqa: BLE001 - any import failure is the verdict
        return Item("torch", FAIL, f"does not import: {type(exc).__name__}: {exc}", 'pip install "torch>=2.8"')
    devices = []
    try:
        if torch.cuda.is_available():
            devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except Exception as exc:   # noqa: BLE001 - a broken driver is a finding, not a crash
        devices.append(f"cuda unusable ({type(exc).__name__}: {exc})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append(f"cpu ({torch.get_num_threads()} threads)")
    ok = _satisfies(torch.__version__.split("+")[0], ">=2.8")
    if ok is False:
        return Item("torch", FAIL, f"{torch.__version__} is older than the supported 2.8", 'pip install "torch>=2.8"')
    return Item("torch", OK, f"{torch.__version__}; devices: {', '.join(devices)}")


def check_autoattack() -> Item:
    from .compat.robustbench import classic_autoattack

    from ._optional import DamagedDependencyError

    try:
        _, backend, version = classic_autoattack()
    except DamagedDependencyError as exc:   # installed but broken (e.g. torchattacks 3.4's autoattack)
        return Item("autoattack", FAIL, str(exc).split("; it is")[0][:300],
                    "pip uninstall autoattack (pyautoattack is then used), or "
                    "pip install git+https://github.com/fra31/auto-attack")
    except ImportError:
        return Item("autoattack", ABSENT, "neither the GitHub autoattack nor pyautoattack is installed "
                                          "(extra [robustbench])", install_hint("robustbench"))
    except Exception as exc:   # noqa: BLE001
        return Item("autoattack", FAIL, f"the AutoAttack backend does not import: {type(exc).__name__}: {exc}",
                    "pip install --force-reinstall --no-deps pyautoattack")
    if backend == "autoattack":
        return Item("autoattack", OK, f"the GitHub autoattack package ({version}) -- used by this package and "
                                      "by RobustBench")
    return Item("autoattack", OK, f"pyautoattack {version} through rb_labelrefine's classic-interface adapter "
                                  "(the name `autoattack` for RobustBench; no GitHub autoattack installed)")


def check_robustbench_import() -> Item:
    if _distribution("robustbench") is None or robustbench_damage() is not None:
        return Item("robustbench import", ABSENT, "skipped (see the robustbench line)")
    try:
        from .compat.robustbench import import_robustbench

        import_robustbench()
        for mod, attr in (("robustbench.eval", "benchmark"), ("robustbench.utils", "load_model")):
            if not hasattr(importlib.import_module(mod), attr):
                raise AttributeError(f"{mod} has no {attr}")
    except Exception as exc:   # noqa: BLE001
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return Item("robustbench import", FAIL, text[:300], ROBUSTBENCH_REPAIR.format(
            version=_distribution("robustbench").version))
    return Item("robustbench import", OK, "robustbench.eval.benchmark and robustbench.utils.load_model import")


def check_requests() -> list:
    items = []
    rb = _distribution("robustbench")
    req = _distribution("requests")
    if req is None:
        if rb is not None:
            return [Item("requests", FAIL, "not installed, but RobustBench requires it", "pip install requests")]
        return [Item("requests", ABSENT, "not installed (only RobustBench needs it)")]
    detail = f"requests {req.version}"
    verdict, repair = OK, None
    if rb is not None:
        spec = _requirements(rb).get("requests")
        if spec and _satisfies(req.version, spec) is False:
            verdict, repair = FAIL, f'pip install "requests{spec}"'
            detail += f" does not meet RobustBench's requirement requests{spec}"
        elif spec:
            detail += f" meets RobustBench's requirement requests{spec}"
    if verdict == OK and _satisfies(req.version, "~=2.25.1"):
        verdict, repair = WARN, "pip install --upgrade requests urllib3"
        detail += (" -- the version torchattacks' metadata pins (requests~=2.25.1, from 2020): installed with "
                   "torchattacks' dependencies, which the README avoids")
    items.append(Item("requests", verdict, detail, repair))
    ul = _distribution("urllib3")
    if ul is not None:
        spec = _requirements(req).get("urllib3")
        if spec and _satisfies(ul.version, spec) is False:
            items.append(Item("urllib3", FAIL, f"{ul.version} does not meet requests {req.version}'s requirement "
                                               f"urllib3{spec}", "pip install --upgrade requests urllib3"))
        else:
            items.append(Item("urllib3", OK, f"{ul.version}" + (f" meets requests' urllib3{spec}" if spec else "")))
    return items


def _module_item(name: str, module: str, dist_name: str, extra: str, note: Callable = None) -> Item:
    dist = _distribution(dist_name)
    if dist is None:
        return Item(name, ABSENT, f"not installed (extra [{extra}])", install_hint(extra))
    try:
        importlib.import_module(module)
    except Exception as exc:   # noqa: BLE001
        return Item(name, FAIL, f"{dist.version} is installed but does not import: {type(exc).__name__}: "
                                f"{str(exc).strip()[:200]}",
                    f"pip install --force-reinstall --no-deps {dist_name}=={dist.version}")
    extra_note = note(dist) if note else None
    if isinstance(extra_note, Item):
        return extra_note
    return Item(name, OK, dist.version + (f"; {extra_note}" if extra_note else ""))


def _timm_note(dist):
    rb = _distribution("robustbench")
    spec = _requirements(rb).get("timm") if rb is not None else None
    if spec and _satisfies(dist.version, spec) is False:
        return Item("timm", WARN, f"{dist.version} does not meet RobustBench's pin timm{spec} (its model-zoo "
                                  "entries are tested with that)", f'pip install "timm{spec}"')
    return f"meets RobustBench's timm{spec}" if spec else None


def _torchattacks_note(dist):
    if any(str(f).startswith("robustbench/") for f in dist.files or []):
        return ("its wheel carries a robustbench/ copy: reinstalling torchattacks overwrites RobustBench's files "
                "(the robustbench line checks them)")
    return None


def check_fashion_mnist(root: Optional[str] = None) -> Item:
    from .data.fashion_mnist import FASHION_MNIST_ROOT, _FILES

    root = Path(root or FASHION_MNIST_ROOT)
    stems = [s for pair in _FILES.values() for s in pair]
    dirs = [root, root / "FashionMNIST" / "raw"]
    found = [s for s in stems if any((d / s).is_file() or (d / (s + ".gz")).is_file() for d in dirs)]
    if len(found) == len(stems):
        return Item("Fashion-MNIST", OK, f"the 4 IDX files are in {root} (the fmnist-* presets)")
    if not found:
        return Item("Fashion-MNIST", ABSENT, f"not in {root} (only the fmnist-* presets need it)",
                    "apt-get install -y dataset-fashion-mnist (Debian/Ubuntu), or --set data.root=DIR with its "
                    "IDX files")
    return Item("Fashion-MNIST", FAIL, f"{root} holds {len(found)} of its 4 IDX files (missing: "
                                       f"{', '.join(s for s in stems if s not in found)})",
                "apt-get install --reinstall -y dataset-fashion-mnist")


def run_checks() -> list:
    from . import __version__

    items = [Item("rb_labelrefine", OK, f"{__version__} at {Path(__file__).parent} (python "
                                        f"{sys.version.split()[0]}, {sys.executable})"),
             check_torch(), check_autoattack(), check_robustbench_files(), check_robustbench_import()]
    items += check_requests()
    items += [_module_item("timm", "timm", "timm", "timm", _timm_note),
              _module_item("torchattacks", "torchattacks", "torchattacks", "attacks", _torchattacks_note),
              _module_item("matplotlib", "matplotlib", "matplotlib", "plot"),
              _module_item("scikit-learn", "sklearn", "scikit-learn", "data"),
              _module_item("huggingface_hub", "huggingface_hub", "huggingface_hub", "hub"),
              _module_item("tensorboard", "tensorboard", "tensorboard", "tensorboard"),
              _module_item("wandb", "wandb", "wandb", "wandb"),
              check_fashion_mnist()]
    return items


def format_items(items) -> str:
    width = max(len(i.name) for i in items)
    lines = []
    for i in items:
        lines.append(f"{i.verdict:5s} {i.name:{width}s}  {i.detail}")
        if i.repair:
            label = {FAIL: "repair", ABSENT: "install"}.get(i.verdict, "fix")
            lines.append(f"{'':5s} {'':{width}s}  {label}: {i.repair}")
    return "\n".join(lines)


def main(items=None) -> int:
    """Print the report; 0 when nothing failed, 1 otherwise."""
    items = run_checks() if items is None else items
    print(format_items(items))
    failed = [i.name for i in items if i.verdict == FAIL]
    if failed:
        print(f"\n{len(failed)} problem(s): {', '.join(failed)} -- run the repair command(s) above, then "
              "`rb-labelrefine doctor` again")
        return 1
    print("\nhealthy" + (" (lines marked -- are optional parts that are not installed)"
                         if any(i.verdict == ABSENT for i in items) else ""))
    return 0
