"""The one door through which rb_labelrefine imports RobustBench.

RobustBench 1.1.1 does ``from autoattack import AutoAttack`` and
``from autoattack.state import EvaluationState`` and calls the *classic* GitHub interface
(``AutoAttack(model, norm=, eps=, version=, device=, log_path=, verbose=, attacks_to_run=)`` and
``run_standard_evaluation(x, y, bs=, state_path=)`` returning ``x_adv``).  The registry's
official package is ``pyautoattack`` 0.2.0: keyword-only arguments, ``attacks=`` instead of
``attacks_to_run=``, no ``verbose``/``log_path``, ``batch_size=`` and a ``(x_adv, y_adv)`` return.

How ``import robustbench`` works on the registry's packages: the installed package puts a
``.pth`` file in site-packages that registers :mod:`~rb_labelrefine.compat.autoattack_hook`'s
meta-path finder at interpreter start, so a plain ``import robustbench`` (no rb_labelrefine
import) finds an ``autoattack`` module:

* if the real GitHub ``autoattack`` is installed, the finder never answers (we step aside);
* otherwise, when ``pyautoattack`` is installed, ``autoattack`` is the module built by
  :func:`build_shim_module`, whose ``AutoAttack`` is :class:`ClassicAutoAttack` -- the classic
  interface on top of pyautoattack's attacks (which are the GitHub master's, line for line) --
  and ``autoattack.<sub>`` (``state``, ``autopgd_base``, ...) is ``pyautoattack.<sub>``.

:func:`import_robustbench` registers the same finder (for a source checkout without the ``.pth``)
and turns a missing extra into an error that says what to install.
Nothing else in the package imports robustbench without going through this module.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from pathlib import Path
from typing import Optional

from .._optional import DamagedDependencyError, MissingExtraError, install_hint, require
from .autoattack_hook import SHIM_MARK as _SHIM_MARK
from .autoattack_hook import AutoattackFinder
from .autoattack_hook import install as install_hook

__all__ = ["import_robustbench", "ClassicAutoAttack", "autoattack_backend", "classic_autoattack",
           "build_shim_module", "install_hook"]


def _real_autoattack_available() -> bool:
    mod = sys.modules.get("autoattack")
    if mod is not None:
        return not getattr(mod, _SHIM_MARK, False)
    # Any finder but our own hook's: importlib.util.find_spec would find the adapter itself.
    return AutoattackFinder._others_find("autoattack", None, None)


def autoattack_backend() -> str:
    """'autoattack' (the GitHub package) or 'pyautoattack' (through the classic adapter)."""
    return "autoattack" if _real_autoattack_available() else "pyautoattack"


class ClassicAutoAttack:
    """The classic ``autoattack.AutoAttack`` interface, implemented on pyautoattack 0.2.0."""

    def __init__(self, model, norm: str = "Linf", eps: float = 0.3, seed: Optional[int] = None,
                 verbose: bool = True, attacks_to_run=(), version: str = "standard",
                 is_tf_model: bool = False, device: str = "cuda", log_path: Optional[str] = None):
        from pyautoattack import AutoAttack as _AA

        if is_tf_model:
            raise NotImplementedError("TensorFlow models are not supported by the pyautoattack adapter")
        attacks = list(attacks_to_run) if attacks_to_run else None
        if version != "custom" and attacks:
            # Same contract as the classic class, which refuses instead of silently running
            # a different attack list than the caller asked for.
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        self._aa = _AA(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed, version=version)
        self._aa.verbose = verbose
        self.log_path = log_path

    @contextlib.contextmanager
    def _logging(self):
        """Route pyautoattack's log records like the classic ``Logger`` does, for one call only.

        The classic class prints every message and appends it to ``log_path``; pyautoattack
        logs to the process-wide ``auto-attack`` logger instead.  A handler added in
        ``__init__`` would outlive this object and write later runs into this run's file, so
        it lives exactly as long as one ``run_*`` call.
        """
        logger = self._aa.logger
        old_level = logger.level
        handlers = []
        if self._aa.verbose and not logger.hasHandlers():
            # Nobody configured logging: print, as the classic Logger does.
            handlers.append(logging.StreamHandler(sys.stdout))
        if self.log_path is not None:
            handlers.append(logging.FileHandler(self.log_path))
        for handler in handlers:
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(_ClassicFormatter())
            logger.addHandler(handler)
        if self._aa.verbose and (logger.level == logging.NOTSET or logger.level > logging.DEBUG):
            logger.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            logger.setLevel(old_level)
            for handler in handlers:
                logger.removeHandler(handler)
                handler.close()

    # Attribute access falls through to pyautoattack (apgd, fab, square, attacks_to_run, ...).
    def __getattr__(self, name):
        return getattr(self.__dict__["_aa"], name)

    def __setattr__(self, name, value):
        if name in ("_aa", "log_path"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._aa, name, value)

    def run_standard_evaluation(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False,
                                state_path=None):
        if state_path is not None and not isinstance(state_path, Path):
            state_path = Path(state_path)
        with self._logging():
            x_adv, y_adv = self._aa.run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
        return (x_adv, y_adv) if return_labels else x_adv

    def run_standard_evaluation_individual(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False):
        with self._logging():
            adv = self._aa.run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
        return {k: (v if return_labels else v[0]) for k, v in adv.items()}

    def clean_accuracy(self, x_orig, y_orig, bs: int = 250):
        with self._logging():
            return self._aa.clean_accuracy(x_orig, y_orig, bs=bs)


class _ClassicFormatter(logging.Formatter):
    """Plain messages, warnings prefixed ``Warning:`` -- the classic log-file format."""

    def format(self, record):
        msg = record.getMessage()
        return f"Warning: {msg}" if record.levelno >= logging.WARNING else msg


def build_shim_module() -> types.ModuleType:
    """The ``autoattack`` adapter module over pyautoattack (used by the import hook)."""
    import pyautoattack
    import pyautoattack.state as pstate

    shim = types.ModuleType("autoattack")
    shim.__doc__ = "rb_labelrefine adapter: the classic autoattack interface on top of pyautoattack"
    shim.AutoAttack = ClassicAutoAttack
    shim.state = pstate
    shim.__version__ = getattr(pyautoattack, "__version__", "unknown")
    setattr(shim, _SHIM_MARK, True)
    return shim


def classic_autoattack():
    """``(AutoAttack class with the classic interface, backend name, backend version)``.

    The real GitHub ``autoattack`` when it is importable, else :class:`ClassicAutoAttack` over
    pyautoattack -- the same choice :func:`import_robustbench` makes for RobustBench, so our own
    evaluations and ``robustbench.eval.benchmark`` always run the same implementation.
    """
    if _real_autoattack_available():
        try:
            mod = sys.modules.get("autoattack") or importlib.import_module("autoattack")
            cls = mod.AutoAttack
        except Exception as exc:   # noqa: BLE001 -- any failure of a broken install is the package's, named
            raise DamagedDependencyError(_broken_autoattack_message(exc)) from exc
        return cls, "autoattack", _version(mod, "autoattack")
    pyautoattack = require("pyautoattack", "robustbench", "AutoAttack evaluation")

    return ClassicAutoAttack, "pyautoattack", _version(pyautoattack, "pyautoattack")


def _broken_autoattack_message(exc: BaseException) -> str:
    """The error of an installed GitHub ``autoattack`` that does not import (e.g. the old copy
    torchattacks 3.4's wheel installs, which imports ``zero_gradients`` from torch's gradcheck,
    gone since torch 2.x)."""
    try:
        import importlib.machinery

        where = getattr(importlib.machinery.PathFinder.find_spec("autoattack"), "origin", None)
    except Exception:   # noqa: BLE001 -- only for the message
        where = None
    detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return (f"the installed package 'autoattack'{f' ({where})' if where else ''} does not import ({detail}); "
            "it is probably the old copy torchattacks 3.4 installs. Run `rb-labelrefine doctor`; remove it with "
            "`pip uninstall autoattack` (pyautoattack is then used) or reinstall the GitHub one: "
            "pip install git+https://github.com/fra31/auto-attack")


def _version(module, dist: str) -> str:
    # The GitHub package has no __version__; its distribution metadata does (setup.py: 0.1).
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(dist)
        except Exception:
            version = "unknown"
    return str(version)


def import_robustbench():
    """Import and return the ``robustbench`` module (the ``autoattack`` hook registered first)."""
    if "robustbench" in sys.modules:
        return sys.modules["robustbench"]
    install_hook()
    from .robustbench_files import damage_message, robustbench_damage

    damage = robustbench_damage()   # e.g. torchattacks' wheel overwrote its files: say so, not AttributeError
    if damage is not None:
        raise DamagedDependencyError(damage_message(damage))
    try:
        return importlib.import_module("robustbench")
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in ("robustbench", "autoattack", "pyautoattack"):
            hint = f"install the extra [robustbench]: {install_hint('robustbench')}"
        elif missing == "pkg_resources":
            hint = 'robustbench.loaders imports pkg_resources: pip install "setuptools<81"'
        else:
            hint = f"reinstall the extra [robustbench]: {install_hint('robustbench')}; `rb-labelrefine doctor` checks it"
        raise MissingExtraError(f"could not import robustbench ({exc}); {hint}") from exc
