"""Imports of optional dependencies, each with an error that names the extra to install.

The core (rectifiers, objectives, attacks, averaging, the trainer on synthetic data) needs only
torch, numpy, safetensors and PyYAML; everything else is an extra of ``pyproject.toml``.
"""
from __future__ import annotations

import importlib

__all__ = ["MissingExtraError", "require", "EXTRAS"]

# module -> extra that installs it
EXTRAS = {
    "robustbench": "robustbench",
    "pyautoattack": "robustbench",
    "timm": "timm",
    "torchvision": "vision",
    "matplotlib": "plot",
    "sklearn": "data",
    "torchattacks": "attacks",
    "PIL": "vision",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str = None, what: str = None):
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the module exists but one of *its* imports is broken: show that error as is
        extra = extra or EXTRAS.get(top, "all")
        needs = f"{what} needs" if what else "this needs"
        raise MissingExtraError(
            f"{needs} the optional dependency '{top}', which is not installed; install it with "
            f'pip install "rb-labelrefine[{extra}]"') from exc
