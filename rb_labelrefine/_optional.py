"""Imports of optional dependencies, each with an error that names the extra and what it installs.

The core (rectifiers, objectives, attacks, averaging, the trainer on synthetic data) needs only
torch, numpy, safetensors and PyYAML; everything else is an extra of ``pyproject.toml``.

The messages say what works from where the user is: rb-labelrefine is installed from a checkout
or a built wheel (it is on no package index), so ``pip install "rb-labelrefine[timm]"`` would fail;
each message names the extra and gives the extra's plain requirements as a ``pip install`` line
(which works anywhere), plus ``pip install -e ".[<extra>]"`` for a checkout.  torchattacks is the
exception: its metadata pins ``requests~=2.25.1`` and its wheel carries an old copy of
``robustbench/``, so its hint installs it without dependencies and then restores RobustBench's own
files -- never the extra itself (README, "torchattacks").
"""
from __future__ import annotations

import importlib

__all__ = ["MissingExtraError", "DamagedDependencyError", "require", "install_hint", "EXTRAS",
           "EXTRA_REQUIREMENTS"]

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
    "huggingface_hub": "hub",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}

# extra -> its requirements, as in pyproject.toml (tests/test_fits_pipeline.py checks they agree)
EXTRA_REQUIREMENTS = {
    "robustbench": ("robustbench>=1.1.1", "pyautoattack>=0.2.0", "setuptools<81", "torchvision>=0.23"),
    "timm": ("timm>=1.0.9",),
    "vision": ("torchvision>=0.23", "pillow>=9"),
    "plot": ("matplotlib>=3.7",),
    "data": ("scikit-learn>=1.3",),
    "attacks": ("torchattacks>=3.5",),
    "hub": ("huggingface_hub>=0.20",),
    "tensorboard": ("tensorboard>=2.14",),
    "wandb": ("wandb>=0.16",),
}

# the repair after torchattacks' wheel overwrote RobustBench's files (README, "torchattacks")
ROBUSTBENCH_REPAIR = "pip install --force-reinstall --no-deps robustbench=={version}"


def _robustbench_version() -> str:
    try:
        from importlib.metadata import version

        return version("robustbench")
    except Exception:
        return "1.1.1"


def install_hint(extra: str) -> str:
    """The commands that install ``extra``'s requirements from where the user is."""
    if extra == "attacks":
        # never `pip install torchattacks` with its dependencies: requests~=2.25.1 downgrades
        # requests/urllib3, and its robustbench/ copy overwrites RobustBench's files
        hint = 'pip install --no-deps "torchattacks>=3.5" scipy'
        try:
            from importlib.metadata import distribution

            distribution("robustbench")
        except Exception:
            return hint + " (without dependencies: its metadata pins requests~=2.25.1)"
        return (hint + " && " + ROBUSTBENCH_REPAIR.format(version=_robustbench_version())
                + " (without dependencies: its metadata pins requests~=2.25.1; the second command puts back "
                  "RobustBench's own files, which torchattacks' wheel overwrites)")
    reqs = EXTRA_REQUIREMENTS.get(extra)
    if reqs is None:
        return f'pip install -e ".[{extra}]" (in an rb_labelrefine checkout)'
    plain = " ".join(f'"{r}"' for r in reqs)
    return f'pip install {plain} (or, in an rb_labelrefine checkout, pip install -e ".[{extra}]")'


from .errors import MissingExtraError  # noqa: E402 (the leaf errors.py: exit code 2)


class DamagedDependencyError(MissingExtraError):
    """An installed dependency's files differ from what its own distribution installed (e.g.
    RobustBench's after torchattacks' wheel overwrote them); the message names the repair."""


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
            f"{needs} the optional dependency '{top}', which is not installed (rb-labelrefine's extra "
            f"[{extra}]); install it with {install_hint(extra)}") from exc
