"""The layout of a training run directory, and loading its models back.

``DIR/config.yaml``          the resolved config (what produced the run)
``DIR/checkpoint.pt``        full resume state (tensors and plain Python data only:
                             readable with ``torch.load(weights_only=True)``)
``DIR/best.safetensors``     weights of the evaluated model at the best validation epoch
``DIR/final.safetensors``    ... at the last epoch
``DIR/history.json``         one record per epoch (clean / robust accuracy, loss, lr, time)
``DIR/summary.json``         best and final metrics, paths
``DIR/curves.png``           clean and robust accuracy per epoch
``DIR/history.csv``          history.json's rows as a table
``DIR/train.log``            what the console showed (epoch lines, notes, the summary; appended on resume)
``DIR/tensorboard/``         TensorBoard event files (``train.tensorboard: true``)

The weight files hold the state dict of the :class:`~rb_labelrefine.models.NormalizedModel`
(inputs in [0, 1]), with ``arch``, ``num_classes``, ``dataset`` and ``epoch`` in the
safetensors metadata.

A run's files prove they belong together: ``checkpoint.pt`` and both weight files carry the
:func:`config_fingerprint` of the resolved config (the fields allowed to differ on resume left
out) and the package version, and :func:`check_fingerprint` compares them with ``config.yaml``
on resume, eval and export, naming the fields that differ.  A field added to the config by a
later version (at its default, which keeps the old behaviour) does not make an older run's files
foreign: see :func:`check_fingerprint` for the rule.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .errors import BadInputError

__all__ = ["RUN_FILES", "load_run_config", "load_run_model", "build_model_for", "read_weights",
           "write_weights", "info_from_metadata", "info_to_metadata", "check_name", "load_state_checked",
           "NAME_RE", "NAME_MAX", "RESUMABLE_DIFFERENCES", "flatten_config",
           "config_fingerprint", "fingerprint_metadata", "check_fingerprint", "check_run_weights",
           "added_later_note", "ADDED_LATER_AS", "as_before"]

# Model and data-set names become file names, path components, model-zoo keys and Python string
# literals in generated code, so one strict pattern covers them all, wherever they come from
# (--name, a config, a weights file's metadata): no separators, dots, quotes, spaces or escapes.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
NAME_MAX = 100
# Range checks for a weights file's data_info: a crafted file must not make the loader build a
# network with a billion outputs before the shapes are compared.
_INFO_LIMITS = {"num_classes": 100_000, "channels": 64, "image_size": 4096}

RUN_FILES = {
    "config": "config.yaml",
    "checkpoint": "checkpoint.pt",
    "best": "best.safetensors",
    "best_pgd_ce": "best_pgd_ce.safetensors",   # only when eval.val_attack is not pgd_ce
    "final": "final.safetensors",
    "history": "history.json",
    "summary": "summary.json",
    "curves": "curves.png",
    "history_csv": "history.csv",               # history.json's rows as a table
    "log": "train.log",                         # what the console showed (appended on --resume)
    "tensorboard": "tensorboard",               # a directory: TensorBoard event files (train.tensorboard)
}


# Fields that may differ between a run and its resume (they do not change the results).
RESUMABLE_DIFFERENCES = {"train.device", "train.threads", "train.log_every", "data.num_workers", "name",
                         "description", "train.tensorboard", "train.dist_timeout_s",
                         "train.wandb"}


# Fields added after runs were written whose old behaviour is not their default in every run: the
# value that reproduces a run written before the field existed, from that run's (flattened) fields.
ADDED_LATER_AS = {
    # before eval.select_on existed, a run with data.val_fraction 0 selected its best checkpoint on
    # the test curve (today that is refused unless eval.select_on: test says so)
    "eval.select_on": lambda old: "test" if old.get("data.val_fraction") in (0, 0.0) else "val",
}


def as_before(key: str, new_value, old_value, old_fields: dict) -> bool:
    """``new_value`` of a field added later (``ADDED_LATER_AS``) reproduces the run whose fields are
    ``old_fields``, which holds ``old_value`` only as the field's default (it predates the field)."""
    rule = ADDED_LATER_AS.get(key)
    return rule is not None and new_value != old_value and new_value == rule(old_fields)


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"attack.eps": ..., "model.kwargs": {...}, ...}`` of a config dict."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k not in ("kwargs", "wandb"):   # (train.wandb: one field)
            out.update(flatten_config(v, key))
        else:
            out[key] = v
    return out


def _fingerprinted_fields(cfg) -> dict:
    from .config import config_to_dict

    return {k: v for k, v in flatten_config(config_to_dict(cfg)).items() if k not in RESUMABLE_DIFFERENCES}


def config_fingerprint(cfg) -> str:
    """SHA-256 (hex, 16 digits) of the config fields that shape a run's results."""
    text = json.dumps(_fingerprinted_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_metadata(cfg) -> dict:
    """What a checkpoint / weights file stores to prove which run wrote it."""
    from . import __version__

    return {"config_fingerprint": config_fingerprint(cfg),
            "run_config": json.dumps(_fingerprinted_fields(cfg), sort_keys=True, default=str),
            "rb_labelrefine": __version__}


def _default_fields(cfg) -> dict:
    """The fingerprinted fields of a freshly built config for ``cfg``'s method: every field at
    its default (the dataclass defaults of :class:`~rb_labelrefine.config.Config` and of the
    method's own settings, ``rb_labelrefine/rectifiers/<method>.py``)."""
    from .config import Config, parse_method

    return _fingerprinted_fields(Config(method=parse_method({"name": cfg.method.name})))


def _as_json(fields: dict) -> dict:
    """``fields`` as they read back from a stored ``run_config`` (tuples as lists, ...)."""
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def check_fingerprint(cfg, stored: dict, what: str, *, require: bool = True) -> list:
    """Refuse (``ValueError``) a file whose stored fingerprint is not ``cfg``'s, naming the fields
    that differ (``stored`` is a checkpoint dict or a weights file's metadata).  A file without a
    fingerprint (written before files carried one) is refused only when ``require``.

    A file written by an older rb_labelrefine, before a config field existed, has a different
    fingerprint although nothing about its run differs (new fields come with a default that keeps
    the old behaviour).  So when the fingerprints differ, the stored ``run_config`` is compared
    with ``cfg`` field by field: a field absent from the stored config whose value in ``cfg`` is
    that field's default (of a freshly built config for the same method) was *added later with its
    default* and is accepted.  Anything else is refused, naming the fields: a different value, a
    stored field that ``cfg`` no longer has, a field absent from the file at a non-default value
    (or a stored ``run_config`` that is not the one its fingerprint was computed from).

    Returns the sorted names of the fields accepted as added later (empty when the fingerprints
    match or the file has none), for the caller to report.
    """
    fp = stored.get("config_fingerprint") if isinstance(stored, dict) else None
    if fp is None:
        if require:
            raise BadInputError(f"{what} carries no run fingerprint, so nothing proves it belongs to this run "
                             "(written by hand or by an older rb_labelrefine); start a new run")
        return []
    if fp == config_fingerprint(cfg):
        return []
    mine = _as_json(_fingerprinted_fields(cfg))
    text = stored.get("run_config")
    try:
        theirs = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        theirs = {}
    if not isinstance(theirs, dict):
        theirs = {}
    # the stored config is the one the fingerprint was computed from (not edited since)
    genuine = bool(theirs) and hashlib.sha256(text.encode()).hexdigest()[:16] == fp
    missing = object()  # a field absent on one side differs even from a None on the other
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k, missing) != theirs.get(k, missing)) if theirs else []
    if genuine and diff:  # (a run_config edited after its fingerprint was computed proves nothing)
        defaults = _as_json(_default_fields(cfg))
        added = [k for k in diff if k not in theirs and k in defaults
                 and (mine[k] == defaults[k] or as_before(k, mine[k], defaults[k], theirs))]
        if len(added) == len(diff):
            return added
        diff = [k for k in diff if k not in added]
    diff.sort(key=lambda k: (k not in mine or k not in theirs, k))  # changed values first: the telling ones
    shown = ", ".join(f"{k}: {theirs.get(k)!r} in the file, {mine.get(k)!r} in config.yaml" for k in diff[:6])
    more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
    raise BadInputError(f"{what} belongs to another run ({shown or 'its config fingerprint differs'}{more}); "
                     "it was not used and nothing was changed")


def added_later_note(what: str, added: list) -> str:
    """The one-line note of :func:`check_fingerprint` accepting fields added after ``what`` was written."""
    return (f"note: {what} was written before {', '.join(added)} existed; accepted: "
            f"{'its value is' if len(added) == 1 else 'their values are'} the default"
            f"{' or what the run did before' if any(k in ADDED_LATER_AS for k in added) else ''}")


def check_run_weights(run_dir, cfg, meta: dict, which: str, log=None) -> list:
    """For export and eval: ``meta`` (of ``run_dir``'s ``which`` weights) belongs to the run whose
    resolved config is ``cfg``.  Weights written before files carried a fingerprint pass.  Returns
    the fields accepted as added later (:func:`check_fingerprint`), also reported to ``log`` (a
    callable taking one line) when given."""
    where = str(Path(run_dir) / RUN_FILES[which])
    added = check_fingerprint(cfg, meta, where, require=False)
    if added and log is not None:
        log(added_later_note(where, added))
    return added


def load_run_config(run_dir):
    from .config import load_config

    path = Path(run_dir) / RUN_FILES["config"]
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run directory: {path} is missing")
    return load_config(str(path))


def build_model_for(cfg, info):
    """Build the (untrained) model a config describes, for the data set ``info`` describes."""
    from .config import ConfigError
    from .models import build_model

    kwargs = cfg.model.kwargs or {}
    try:
        return build_model(cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
                           image_size=info.image_size, mean=info.mean, std=info.std, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, OverflowError, ZeroDivisionError) as exc:
        field = "model.kwargs" if kwargs else "model.arch"
        raise ConfigError(field, f"{cfg.model.arch} cannot be built with {kwargs or 'its defaults'} "
                          f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None


def write_weights(model: torch.nn.Module, path, metadata: Optional[dict] = None) -> Path:
    """Write a state dict as safetensors, atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save

    from .fileio import atomic_write_bytes

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    # serialised in memory, written by Python: a full disk or a read-only directory is an OSError
    # naming the path (and the bytes needed), not an opaque SafetensorError
    return atomic_write_bytes(path, save(state, metadata=meta))


MAX_WEIGHTS_BYTES = 64 << 30   # the largest weights file read (a WRN-70-16 in float32: 1.1 GB)


def read_weights(path, *, follow_links: Optional[bool] = None) -> tuple[dict, dict]:
    """Read a safetensors file: ``(state_dict, metadata)``.  Never executes code.

    The file must be a regular file (a FIFO or device is refused before it can hang or flood the
    reader) of at most :data:`MAX_WEIGHTS_BYTES`, read through the descriptor that was checked; a
    run directory's own weights (``best``/``final``/``best_pgd_ce.safetensors``) are never read
    through a symbolic link (``follow_links`` None: other names, e.g. a teacher's file named in a
    config, may be links)."""
    from safetensors import safe_open

    from .safe_files import open_regular

    path = Path(path)
    if follow_links is None:
        follow_links = path.name not in {RUN_FILES[k] for k in ("best", "final", "best_pgd_ce")}
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, f"weights file not found: {path}", str(path))
    fd = open_regular(path, max_bytes=MAX_WEIGHTS_BYTES, follow_links=follow_links)
    try:
        via = f"/proc/self/fd/{fd}"
        source = via if os.path.exists(via) else str(path)
        try:
            with safe_open(source, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise BadInputError(f"{path} is not a valid safetensors file ({str(exc)[:300]})") from None
    finally:
        os.close(fd)
    return state, meta


def check_weight_values(state: dict, expected: dict, where: str) -> None:
    """Refuse weights whose values cannot be the model's (exit 2 naming the tensor): a tensor of a
    floating-point parameter or buffer that is not floating point (int8, bool, complex -- loading
    would cast it silently) or holds NaN/inf; an integer buffer (BatchNorm's counter) that is not
    an integer."""

    for k, want in expected.items():
        v = state.get(k)
        if v is None or not torch.is_tensor(v):
            continue
        if want.is_floating_point():
            if not v.is_floating_point():
                raise BadInputError(f"{where}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}, not floating "
                                    f"point (the model's is {str(want.dtype).replace('torch.', '')}); refusing to cast it")
            bad = int((~torch.isfinite(v)).sum()) if v.numel() else 0
            if bad:
                raise BadInputError(f"{where}: tensor {k!r} holds {bad} non-finite value(s) (NaN/inf) of {v.numel()}; "
                                    "the weights are broken")
        elif v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise BadInputError(f"{where}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}, the model's is "
                                f"{str(want.dtype).replace('torch.', '')}")


def check_name(value, field: str) -> str:
    """``value`` if it is a valid model / data-set name (see ``NAME_RE``), else ``ValueError``
    naming ``field``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise BadInputError(f"{field}: {shown} is not a valid name: it must start with a letter and use only letters, "
                         "digits, '_' and '-' (it becomes a file name and a model-zoo key), e.g. "
                         "'Author2026_Method_Arch'")
    if len(value) > NAME_MAX:
        raise BadInputError(f"{field}: the name has {len(value)} characters; at most {NAME_MAX} are allowed")
    return value


def _int_field(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadInputError(f"{where}: data_info.{key} must be an integer, got {v!r}"
                         + (" (missing)" if key not in d else ""))
    if not 1 <= v <= _INFO_LIMITS[key]:
        raise BadInputError(f"{where}: data_info.{key} must be in [1, {_INFO_LIMITS[key]}], got {v}")
    return v


def _stats_field(d: dict, key: str, channels: int, where: str) -> tuple:
    v = d.get(key)
    if (not isinstance(v, list) or len(v) not in (1, channels)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise BadInputError(f"{where}: data_info.{key} must be a list of 1 or {channels} finite numbers, got {v!r}")
    if key == "std" and not all(x > 0 for x in v):
        raise BadInputError(f"{where}: data_info.std must be positive, got {v}")
    return tuple(float(x) for x in v)


def info_from_metadata(meta: dict, where: str = "the weights file"):
    """The :class:`~rb_labelrefine.data.DataInfo` a weights file was trained for (stored in its
    metadata, so loading a model never needs the data set).

    The metadata is untrusted input: every field is type- and range-checked and the name is
    checked like a model name; errors name ``where`` (the file) and the field.
    """
    from .data import DataInfo

    if "data_info" not in meta:
        raise BadInputError(f"{where} has no 'data_info' metadata (not written by rb_labelrefine?)")
    try:
        d = json.loads(meta["data_info"])
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{where}: metadata data_info is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise BadInputError(f"{where}: metadata data_info must be a JSON object, got {type(d).__name__}")
    name = check_name(d.get("name"), f"{where}: data_info.name")
    num_classes, channels, image_size = (_int_field(d, k, where) for k in ("num_classes", "channels", "image_size"))
    source = d.get("source", "")
    if not isinstance(source, str):
        raise BadInputError(f"{where}: data_info.source must be a string, got {type(source).__name__}")
    return DataInfo(name=name, num_classes=num_classes, channels=channels, image_size=image_size,
                    mean=_stats_field(d, "mean", channels, where), std=_stats_field(d, "std", channels, where),
                    source=source)


def load_state_checked(model: torch.nn.Module, state: dict, where: str, arch: str) -> torch.nn.Module:
    """``model.load_state_dict(state)``, refusing with the keys that differ (missing, unexpected,
    or of another shape) rather than torch's message, whose first line names none."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)}, {arch} has {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing:
        problems.append(f"missing keys {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}"
                        + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    if shapes:
        problems.append("; ".join(shapes[:3]) + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""))
    if problems:
        raise BadInputError(f"{where} does not match {arch}: " + "; ".join(problems))
    check_weight_values(state, expected, where)
    model.load_state_dict(state)
    return model


def info_to_metadata(info) -> str:
    return json.dumps({"name": info.name, "num_classes": info.num_classes, "channels": info.channels,
                       "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                       "source": getattr(info, "source", "")})


def load_run_model(run_dir, which: str = "best", device="cpu", log=None):
    """Rebuild the model of a run and load its ``best`` or ``final`` weights (or ``best_pgd_ce``:
    the checkpoint cross-entropy PGD would have selected, kept when ``eval.val_attack`` is another
    attack).

    Returns ``(model, cfg, info)``; the model is in eval mode and takes [0, 1] inputs.  ``log``
    (a callable taking one line) is told of config fields accepted as added after the weights
    were written (:func:`check_fingerprint`).
    """
    if which not in ("best", "final", "best_pgd_ce"):
        raise BadInputError(f"which must be 'best', 'final' or 'best_pgd_ce', got {which!r}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / RUN_FILES[which]
    state, meta = read_weights(path)
    check_run_weights(run_dir, cfg, meta, which, log=log)
    info = info_from_metadata(meta, str(path))
    model = load_state_checked(build_model_for(cfg, info), state, str(path), cfg.model.arch)
    return model.to(device).eval(), cfg, info


def load_error_detail(exc) -> str:
    """The informative line of a load_state_dict error (its first line is only "Error(s) in
    loading state_dict for X:"; the next names the missing keys or the mismatching shapes)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__))[:300]
