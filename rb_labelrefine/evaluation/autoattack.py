"""AutoAttack (Croce & Hein, 2020) through the official implementation.

The attack code is never reimplemented here: :func:`run_autoattack` drives the classic
``AutoAttack`` class chosen by :func:`rb_labelrefine.compat.robustbench.classic_autoattack` --
the GitHub ``autoattack`` package when it is installed, otherwise pyautoattack (the registry's
official package, whose attack files are the GitHub master's) behind the classic-interface
adapter.  RobustBench's ``benchmark`` goes through the same choice, so both report the same
implementation.

What comes back is plain data (numbers in percent, lists of strings) that can be written to
JSON and rendered into a model card: clean and robust accuracy, the robust accuracy after each
attack as AutoAttack logs it, AutoAttack's own sanity flags (randomised / probability outputs /
dynamic defences / too many target classes / zero gradients / Square beating the white-box
attacks), the attack settings, the backend and its version, the machine and the elapsed time,
and per point: correct after the whole suite (``robust_correct``) and after each stage
(``per_attack_correct``, AutoAttack's own robust flags recorded inside the one run, see
:func:`_stage_recorder`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import re
import sys
import tempfile
import threading
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..compat.robustbench import classic_autoattack
from .pgd import eval_mode
from ..errors import BadInputError

__all__ = ["ATTACKS", "VERSIONS", "AA_NORMS", "STANDARD_ATTACKS", "run_autoattack", "machine_info",
           "describe_autoattack", "square_attack_class", "rng_guard"]

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand", "custom")
AA_NORMS = ("Linf", "L2", "L1")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
# Sub-attacks whose settings attack_params may change, as attribute names on the AutoAttack object.
_COMPONENTS = ("apgd", "apgd_targeted", "fab", "square")

_AFTER_RE = re.compile(r"robust accuracy after ([A-Za-z0-9\-]+):\s*([0-9.]+)%")
_INITIAL_RE = re.compile(r"initial accuracy:\s*([0-9.]+)%")


def _cpu_name() -> str:
    try:  # Linux: the marketing name; platform.processor() is often just "x86_64" or empty
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def rng_guard(device):
    """Fork torch's RNG for the block: AutoAttack and Square reseed the *global* generator,
    which would otherwise change the data order and augmentation of a training run that
    evaluates mid-way."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def machine_info(device="cpu") -> dict:
    """Where a number was measured: device kind and name, torch version, CPU threads."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(terse=True),
    }


def _validate(norm, eps, version, attacks, x, y, n_ex, batch_size):
    if norm not in AA_NORMS:
        raise BadInputError(f"unknown norm {norm!r}; AutoAttack supports {list(AA_NORMS)}")
    if not eps > 0:
        raise BadInputError(f"eps must be > 0, got {eps}")
    if version not in VERSIONS:
        raise BadInputError(f"unknown AutoAttack version {version!r}; choose one of {list(VERSIONS)}")
    if version == "custom":
        if not attacks:
            raise BadInputError(f"version='custom' needs attacks=[...], a subset of {list(ATTACKS)}")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise BadInputError(f"unknown attacks {unknown}; choose from {list(ATTACKS)}")
    elif attacks:
        raise BadInputError(f"attacks={list(attacks)} is only used with version='custom' "
                         f"(version={version!r} runs its own fixed list)")
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a float tensor [N, C, H, W] of images in [0, 1]")
    if not torch.is_tensor(y) or y.dim() != 1 or len(y) != len(x):
        raise ValueError("y must be a 1-D tensor of integer labels, one per image")
    if len(x) == 0:
        raise ValueError("no data to evaluate")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"inputs must be in [0, 1] (normalisation belongs inside the model); "
                         f"got values in [{lo:.3g}, {hi:.3g}]")
    if n_ex is not None and n_ex < 1:
        raise BadInputError(f"n_ex must be >= 1, got {n_ex}")
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")


def _apply_attack_params(adversary, attack_params: dict) -> None:
    """Set e.g. ``{"apgd.n_iter": 10, "square.n_queries": 100}`` on AutoAttack's sub-attacks."""
    for key, value in attack_params.items():
        comp, _, attr = key.partition(".")
        if comp not in _COMPONENTS or not attr:
            raise BadInputError(f"attack_params key {key!r} must look like '<component>.<attribute>' "
                             f"with component one of {list(_COMPONENTS)}")
        target = getattr(adversary, comp)
        if not hasattr(target, attr):
            raise BadInputError(f"{comp} has no setting {attr!r}")
        setattr(target, attr, value)


def square_attack_class():
    """The official Square Attack class from the same backend :func:`run_autoattack` uses."""
    _, backend, _ = classic_autoattack()
    if backend == "autoattack":
        from autoattack.square import SquareAttack
    else:
        from pyautoattack.square import SquareAttack
    return SquareAttack


class AutoAttackLogCapture(logging.Handler):
    """Collects pyautoattack's log records (its messages and its sanity-check warnings)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.flags: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        self.lines.append(msg)
        if record.levelno >= logging.WARNING:
            self.flags.append(msg)


def _perturbation_norms(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    d = (x_adv - x).flatten(1)
    if norm == "Linf":
        return d.abs().max(1)[0]
    if norm == "L2":
        return d.norm(dim=1)
    return d.abs().sum(1)


def describe_autoattack(result: dict) -> str:
    """``AutoAttack standard (Linf, eps=8/255)`` or ``AutoAttack custom [apgd-ce] ...`` for cards."""
    from .pgd import format_eps

    kind = "standard" if result.get("standard") else (
        f"{result.get('version')} [{', '.join(result.get('attacks') or [])}]")
    extra = ", non-default attack settings" if result.get("attack_params") else ""
    return f"AutoAttack {kind} ({result.get('norm')}, eps={format_eps(result.get('eps'))}{extra})"


# ----------------------------------------------------------------------------- per-stage flags
#
# Why a hook and not one AutoAttack call per stage: run stage by stage (version="custom",
# attacks_to_run=[stage] on the points still robust) every perturb call would get the same
# batch and seed, but the result is not provably the same run -- each call recomputes the clean
# predictions of the surviving points in differently composed batches (a borderline point can
# flip on another BLAS path), re-runs the defence checks, and check_square_sr (Square beating
# the white-box attacks) never fires since each call sees only its own stage.  So instead the
# suite's own ``robust_flags`` are copied as ``run_standard_evaluation`` reports them to its
# ``EvaluationState``: once after the clean pass, and in ``add_run_attack`` after each stage.
# That is the single run itself, at no extra attack or forward cost.

_RECORDER = threading.local()
_INSTALL_LOCK = threading.Lock()


def _recording_state_class(base):
    class RecordingEvaluationState(base):
        """AutoAttack's ``EvaluationState``, also copying the robust flags to the active recorder.

        Without a recorder on this thread (``_stage_recorder``) it behaves exactly as ``base``.
        """

        _rb_labelrefine_recording = True

        @property
        def robust_flags(self):
            return base.robust_flags.fget(self)

        @robust_flags.setter
        def robust_flags(self, flags):
            base.robust_flags.fset(self, flags)
            rec = getattr(_RECORDER, "stages", None)
            # The first assignment is the clean pass; later ones are per attack batch.
            if rec is not None and flags is not None and "clean" not in rec:
                rec["clean"] = flags.detach().cpu().clone()

        def add_run_attack(self, attack):
            super().add_run_attack(attack)
            rec = getattr(_RECORDER, "stages", None)
            if rec is not None and self.robust_flags is not None:
                rec[attack] = self.robust_flags.detach().cpu().clone()

    RecordingEvaluationState.__name__ = RecordingEvaluationState.__qualname__ = base.__name__
    return RecordingEvaluationState


def _install_stage_hook(adversary) -> bool:
    """Make the module that runs ``adversary``'s suite build recording states; False if it can't.

    Installed once per process (idempotent, thread-safe); inert unless a recorder is active.
    """
    inner = adversary.__dict__.get("_aa", adversary)  # the classic adapter wraps pyautoattack
    module = sys.modules.get(type(inner).__module__)
    base = getattr(module, "EvaluationState", None) if module is not None else None
    if not isinstance(base, type):
        return False  # e.g. a GitHub autoattack older than its state support
    if getattr(base, "_rb_labelrefine_recording", False):
        return True
    if not (isinstance(getattr(base, "robust_flags", None), property) and hasattr(base, "add_run_attack")):
        return False
    with _INSTALL_LOCK:
        if not getattr(module.EvaluationState, "_rb_labelrefine_recording", False):
            module.EvaluationState = _recording_state_class(base)
    return True


@contextlib.contextmanager
def _stage_recorder():
    """Collect ``{"clean": flags, stage: flags, ...}`` of the AutoAttack run inside the block."""
    previous = getattr(_RECORDER, "stages", None)
    _RECORDER.stages = stages = {}
    try:
        yield stages
    finally:
        _RECORDER.stages = previous


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "Linf", eps: float = 8 / 255,
                   version: str = "standard", attacks: Optional[Sequence[str]] = None, n_ex: Optional[int] = None,
                   batch_size: int = 250, seed: Optional[int] = 0, device="cpu", log_path=None,
                   attack_params: Optional[dict] = None, verbose: bool = False,
                   stage_points: bool = True) -> dict:
    """Run AutoAttack on ``model`` (inputs in [0, 1]) and return a JSON-ready summary.

    Args:
        norm, eps: the threat model (``Linf``/``L2``/``L1``; eps in [0, 1] pixel units).
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square: the RobustBench protocol),
            ``plus``, ``rand`` or ``custom`` with ``attacks=[...]``.
        n_ex: evaluate on the first ``n_ex`` points only (quick runs; reported as ``n``).
        attack_params: overrides of AutoAttack's sub-attack settings for quick runs, e.g.
            ``{"square.n_queries": 100, "apgd.n_iter": 20}``; a run with overrides is never
            reported as ``standard``.
        seed: AutoAttack's seed (``None``: time-based, as upstream).
        device: where the model and each batch run; the model is moved there and evaluated in
            eval mode (its previous mode is restored).
        log_path: also write AutoAttack's log there (classic format).
        verbose: echo AutoAttack's log to stdout.
        stage_points: also return ``per_attack_correct`` (AutoAttack's own per-point flags
            after each stage, recorded inside this one run: no extra attack or forward pass;
            False leaves the key out).

    Returns a dict with ``clean_acc``/``robust_acc`` (percent, measured on the returned
    adversarial examples), ``n``, ``per_attack`` (robust accuracy after each attack, percent,
    as logged by AutoAttack), ``flags`` (AutoAttack's own warnings), ``max_perturbation`` and
    ``perturbation_ok``, ``robust_correct`` (per point, 0/1, in data order), ``elapsed_s``,
    ``backend``/``backend_version``, the settings and ``machine``.

    With ``stage_points``, ``per_attack_correct`` maps ``"clean"`` and every stage that ran
    (AutoAttack's order; it stops early once no point is left) to 0/1 per point in data order:
    still correct after that stage.  These are the suite's own robust flags, so each stage's
    mean is its ``per_attack`` entry (which AutoAttack logs rounded to 0.01 %), and a point
    robust after a stage was robust after the one before.  ``robust_correct`` is re-measured on
    the returned adversarial examples; it equals the last stage's flags unless a point sits so
    close to the decision boundary that another batch composition flips its prediction.
    ``None`` if the installed AutoAttack has no ``EvaluationState`` to record from.
    """
    attacks = list(attacks) if attacks else None
    _validate(norm, eps, version, attacks, x, y, n_ex, batch_size)
    if n_ex is not None:
        x, y = x[:n_ex], y[:n_ex]
    x, y = x.detach().cpu(), y.detach().cpu().long()
    AutoAttack, backend, backend_version = classic_autoattack()
    device = torch.device(device)
    model = model.to(device)

    own_log = None
    if backend == "autoattack" and log_path is None:
        # The GitHub package only reports through print + log file; keep a private file to parse.
        fd, own_log = tempfile.mkstemp(prefix="autoattack_", suffix=".log")
        os.close(fd)
    kwargs = dict(norm=norm, eps=eps, seed=seed, verbose=True, version=version, device=str(device),
                  log_path=str(log_path) if log_path is not None else own_log)
    if version == "custom":
        kwargs["attacks_to_run"] = attacks

    text_log = own_log or (str(log_path) if backend == "autoattack" and log_path is not None else None)
    # The classic Logger appends: remember where this run's lines start.
    log_offset = os.path.getsize(text_log) if text_log and os.path.exists(text_log) else 0

    handlers = [AutoAttackLogCapture()]
    if verbose and backend == "pyautoattack":
        echo = logging.StreamHandler(sys.stdout)
        echo.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(echo)
    capture = handlers[0]
    aa_logger = logging.getLogger("auto-attack")
    stdout = io.StringIO()
    start = time.perf_counter()
    try:
        with eval_mode(model), rng_guard(device), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adversary = AutoAttack(model, **kwargs)
            if attack_params:
                _apply_attack_params(adversary, attack_params)
            recording = stage_points and _install_stage_hook(adversary)
            for h in handlers:
                aa_logger.addHandler(h)
            try:
                redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(stdout)
                recorder = _stage_recorder() if recording else contextlib.nullcontext({})
                with redirect, recorder as stage_flags:
                    x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
            finally:
                for h in handlers:
                    aa_logger.removeHandler(h)
            with torch.no_grad():
                clean_mask, robust_mask = [], []
                for i in range(0, len(x), batch_size):
                    xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                    clean_mask.append((model(xb).argmax(1) == yb).cpu())
                    robust_mask.append((model(x_adv[i:i + batch_size].to(device)).argmax(1) == yb).cpu())
                clean_mask, robust_mask = torch.cat(clean_mask), torch.cat(robust_mask)
                clean_correct, robust_correct = int(clean_mask.sum()), int(robust_mask.sum())
        elapsed = time.perf_counter() - start
        lines = list(capture.lines)
        flags = list(capture.flags)
        if text_log is not None:
            with open(text_log) as f:
                f.seek(log_offset)
                text = f.read()
            lines += text.splitlines()
            flags += [ln[len("Warning:"):].strip() for ln in text.splitlines() if ln.startswith("Warning:")]
        # Checks called without a logger fall back to warnings.warn from autoattack's checks.py.
        flags += [str(w.message) for w in caught if "autoattack" in str(w.filename).lower()]
    finally:
        if own_log is not None and os.path.exists(own_log):
            os.remove(own_log)

    per_attack = {}
    for ln in lines:
        m = _AFTER_RE.search(ln)
        if m:
            per_attack[m.group(1).lower()] = float(m.group(2))
    run_list = list(attacks) if version == "custom" else list(getattr(adversary, "attacks_to_run", []) or [])
    norms = _perturbation_norms(x_adv.float(), x.float(), norm)
    max_pert = float(norms.max()) if len(norms) else 0.0
    n = len(x)
    result = {
        "clean_acc": 100.0 * clean_correct / n,
        "robust_acc": 100.0 * robust_correct / n,
        # per point, in data order (1 = still correct on its adversarial example): paired comparisons
        "robust_correct": [int(v) for v in robust_mask],
        "n": n,
        "norm": norm,
        "eps": float(eps),
        "version": version,
        "attacks": run_list,
        "attack_params": dict(attack_params or {}),
        "standard": version == "standard" and not attack_params,
        "seed": seed,
        "per_attack": per_attack,
        "flags": _dedupe(flags),
        "max_perturbation": max_pert,
        # AutoAttack projects in float32; a hair above eps is rounding, more is a bug.
        "perturbation_ok": bool(max_pert <= eps * (1 + 1e-4) + 1e-6),
        "elapsed_s": elapsed,
        "backend": backend,
        "backend_version": backend_version,
        "batch_size": batch_size,
        "machine": machine_info(device),
    }
    if stage_points:
        result["per_attack_correct"] = ({k: [int(v) for v in f] for k, f in stage_flags.items()}
                                        if recording else None)
    if not result["perturbation_ok"]:
        result["flags"].append(f"adversarial examples exceed the {norm} budget: max perturbation "
                               f"{max_pert:.6g} > eps {eps:.6g}")
    return result


def _dedupe(items):
    seen, out = set(), []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out
