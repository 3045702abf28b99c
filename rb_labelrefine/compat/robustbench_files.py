"""Is the installed RobustBench the one its distribution installed?  (Its files against the sha256
in its own ``RECORD``, and whether ``import robustbench`` finds another copy.)

torchattacks' wheels carry an old ``robustbench/`` that overwrites RobustBench's files when
torchattacks is installed after it; the import then fails deep inside (``AttributeError:
corruptions_3d``).  Both ``compat.robustbench.import_robustbench`` (to refuse with the repair
command) and ``rb-labelrefine doctor`` (to report it) use these checks; they live here, below
both, so that neither imports the other.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path
from typing import Optional

from .._optional import ROBUSTBENCH_REPAIR

__all__ = ["distribution", "robustbench_origin", "robustbench_damage", "damage_text", "damage_message"]


def distribution(name: str):
    """``importlib.metadata.distribution(name)`` or ``None``."""
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def robustbench_origin() -> Optional[str]:
    """The ``robustbench/__init__.py`` that ``import robustbench`` uses (or would use), without importing it."""
    mod = sys.modules.get("robustbench")
    if mod is not None:
        return getattr(mod, "__file__", None)
    try:
        spec = importlib.util.find_spec("robustbench")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def robustbench_damage(dist=None) -> Optional[dict]:
    """What is wrong with the installed RobustBench, or ``None`` when it is intact (or absent).

    ``{"version", "changed": [...], "missing": [...], "checked": n, "shadowed_by": path or None}``:
    files whose sha256 differs from the distribution's ``RECORD``, files it lists that are gone, and
    a ``robustbench`` package that ``import`` finds somewhere else than the distribution put it.
    """
    dist = dist if dist is not None else distribution("robustbench")
    if dist is None:
        return None
    changed, missing, checked = [], [], 0
    for f in dist.files or []:
        if f.hash is None or not str(f).startswith("robustbench/"):
            continue
        checked += 1
        try:
            data = Path(f.locate()).read_bytes()
        except FileNotFoundError:
            missing.append(str(f))
            continue
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, data).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            changed.append(str(f))
    shadowed = None
    origin = robustbench_origin()
    expected = Path(dist.locate_file("robustbench/__init__.py"))
    if origin and expected.exists() and checked:
        try:
            if Path(origin).resolve() != expected.resolve():
                shadowed = str(Path(origin).parent)
        except OSError:
            pass
    if not changed and not missing and shadowed is None:
        return None
    return {"version": dist.version, "changed": changed, "missing": missing, "checked": checked,
            "shadowed_by": shadowed}


def damage_text(d: dict) -> str:
    parts = []
    if d["changed"] or d["missing"]:
        bad = d["changed"] + d["missing"]
        shown = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
        parts.append(f"{len(d['changed'])} of its {d['checked']} installed files differ from its RECORD"
                     + (f" and {len(d['missing'])} are missing" if d["missing"] else "") + f" ({shown})")
    if d["shadowed_by"]:
        parts.append(f"`import robustbench` finds {d['shadowed_by']}, not the installed distribution's files")
    owners = []
    ta = distribution("torchattacks")
    if ta is not None and any(str(f).startswith("robustbench/") for f in ta.files or []):
        owners.append(f"torchattacks {ta.version}'s wheel carries its own robustbench/ copy, which overwrites "
                      "RobustBench's files when installed after it")
    return "; ".join(parts + owners)


def damage_message(d: dict) -> str:
    """The error for a damaged RobustBench (raised by ``import_robustbench`` before its import fails
    somewhere inside, e.g. with ``AttributeError: corruptions_3d``)."""
    return (f"the installed RobustBench {d['version']} is damaged: {damage_text(d)}. Repair it with "
            f"{ROBUSTBENCH_REPAIR.format(version=d['version'])} (then `rb-labelrefine doctor` checks the environment)")
