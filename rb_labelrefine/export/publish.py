"""What a RobustBench submission and a Hub upload need beyond the weights: ``eps`` as RobustBench
writes it, files without local paths, the filled "[New Model]" issue text, and the registration a
``model_zoo_entry.py`` performs when a reviewer imports it.

RobustBench's own ``model_info/*.json`` write ``eps`` as a string: ``"8/255"``, ``"4/255"`` for
ℓ∞ radii on the 1/255 grid, ``"0.5"`` for ℓ2, ``"0.031"`` for TRADES' radius
(``model_info/cifar10/Linf/Zhang2019Theoretically.json``).  Its "[New Model]" issue template is
``.github/ISSUE_TEMPLATE/new-model.md`` of RobustBench/robustbench; :func:`new_model_issue` fills it.
"""
from __future__ import annotations

import math
import os
from pathlib import PurePosixPath, PureWindowsPath
from typing import Optional
from ..errors import BadInputError

__all__ = ["eps_text", "portable", "local_paths", "local_paths_in", "new_model_issue", "REGISTER_IMPORTS",
           "register_line", "ISSUE_FILE"]

ISSUE_FILE = "ROBUSTBENCH_NEW_MODEL.md"

# the names model_zoo_entry.py imports to register itself (module -> names)
REGISTER_IMPORTS = {"robustbench.model_zoo": ["model_dicts"],
                    "robustbench.model_zoo.enums": ["BenchmarkDataset", "ThreatModel"]}


def register_line(dataset: str, threat_model: str) -> str:
    """The statement with which ``model_zoo_entry.py`` adds ``ENTRY`` to RobustBench's zoo."""
    return f"model_dicts[BenchmarkDataset({dataset!r})][ThreatModel({threat_model!r})][ENTRY[0]] = ENTRY[1]"


def eps_text(eps: float, threat_model: str) -> str:
    """``eps`` as RobustBench's model_info writes it: ``"8/255"`` for an ℓ∞ radius k/255 (k a whole
    number), otherwise the shortest decimal that reads back as the value (``"0.5"``, ``"0.031"``)."""
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise BadInputError(f"eps must be a positive number, got {eps!r}")
    if threat_model == "Linf":
        k = round(eps * 255)
        if k >= 1 and abs(eps - k / 255) <= 1e-9:
            return f"{k}/255"
    text = repr(eps)
    if "e" in text:                     # 1e-05: plain decimals, as RobustBench writes them
        text = format(eps, ".15f").rstrip("0").rstrip(".")
    return text


def _is_local_path(value: str) -> bool:
    return (value.startswith(("/", "~")) or PureWindowsPath(value).drive != ""
            or value.startswith("." + os.sep) or value.startswith(".." + os.sep))


def portable(value):
    """``value`` with every string that is a local path (absolute, ``~``, ``./``, ``../``, a Windows
    drive) replaced by its last component: what an exported file may say about where things were."""
    if isinstance(value, str):
        if _is_local_path(value):
            name = PureWindowsPath(value).name if PureWindowsPath(value).drive else PurePosixPath(value).name
            return name or "."
        return value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value


def local_paths(value) -> set:
    """Every string in ``value`` (nested dicts/lists) that :func:`portable` would shorten."""
    if isinstance(value, str):
        return {value} if _is_local_path(value) and len(value) > 2 else set()
    if isinstance(value, dict):
        return set().union(*(local_paths(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(local_paths(v) for v in value)) if value else set()
    return set()


_TEXT_SUFFIXES = (".json", ".md", ".py", ".txt", ".yaml", ".yml")


def local_paths_in(directory, needles) -> list:
    """``[(file, path)]``: which of ``needles`` (local paths) a text file of ``directory`` or a
    ``.safetensors`` header contains."""
    import json
    from pathlib import Path

    needles = sorted({str(n) for n in needles if n and len(str(n)) > 2})
    found = []
    for f in sorted(Path(directory).rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                text = json.dumps(json.loads(fh.read(n)).get("__metadata__", {}))
        elif f.suffix in _TEXT_SUFFIXES:
            text = f.read_text(errors="replace")
        else:
            continue
        found += [(str(f.relative_to(directory)), n) for n in needles if n in text or json.dumps(n)[1:-1] in text]
    return found


def _v(value, unknown: str = "not measured") -> str:
    return unknown if value in (None, "") else str(value)


def new_model_issue(*, model_name: str, model_info: dict, threat_model: str, evaluation: Optional[str],
                    in_zoo_terms: bool, checkpoint: Optional[str], license: str = "mit") -> str:
    """RobustBench's "[New Model]" issue, filled from the export: ``model_name`` is the zoo name
    (``--name``), ``model_info`` the dict written to ``model_info/...json``."""
    box = lambda on: "x" if on else " "  # noqa: E731
    mit = (license or "").lower() == "mit"
    lic = ("under MIT license" if mit else
           f"**OR** under a custom license, located here: {license} (replace with the license's URL)")
    arch_line = ("included among those [here](https://github.com/RobustBench/robustbench/tree/master/robustbench/"
                 "model_zoo/architectures) or in `timm`" if in_zoo_terms else
                 "NOT included among RobustBench's architectures or timm's: add the link to its implementation "
                 "(rb_labelrefine's `rb_labelrefine/models/`) so that it can be added")
    return f"""[New Model] {model_name}

<!-- Generated by rb_labelrefine's export: the issue text of RobustBench's "New Model(s)" template
(.github/ISSUE_TEMPLATE/new-model.md), filled from model_info. Title: the first line. Check every
value, fill what says "fill in", and attach or link the files of this export. -->

# Paper Information

- **Paper Title**: {_v(model_info.get("name"), "fill in")}
- **Paper URL**: {_v(model_info.get("link"), "fill in (export --link)")}
- **Paper authors**: {_v(model_info.get("authors"), "fill in (export --authors)")}

# Leaderboard Claim(s)

## Model 1

- **Architecture**: {_v(model_info.get("architecture"))}
- **Threat Model**: {threat_model}
- **eps**: {_v(model_info.get("eps"))}
- **Clean accuracy**: {_v(model_info.get("clean_acc"))}{"%" if model_info.get("clean_acc") else ""}
- **Robust accuracy**: {_v(model_info.get("autoattack_acc"))}{"%" if model_info.get("autoattack_acc") else ""}
- **Additional data**: {str(bool(model_info.get("additional_data"))).lower()}
- **Evaluation method**: {_v(evaluation)}
- **Checkpoint and code**: {_v(checkpoint, "fill in the URL of the checkpoint (e.g. export --push-to-hub REPO)")}; the model-zoo entry is `model_zoo_entry.py` of the export (`import model_zoo_entry` registers it; then `robustbench.utils.load_model(model_name={model_name!r}, model_dir="models", dataset={model_info.get("dataset")!r}, threat_model={threat_model!r})`)

# Model Zoo:

- [x] I want to add my models to the Model Zoo (check if true)
- [{box(in_zoo_terms)}] I use an architecture that is {arch_line}.
- [{box(mit)}] I agree to release my model(s) {lic}
"""
