"""The layout of a training run directory, and loading its models back.

``DIR/config.yaml``          the resolved config (what produced the run)
``DIR/checkpoint.pt``        full resume state (tensors and plain Python data only:
                             readable with ``torch.load(weights_only=True)``)
``DIR/best.safetensors``     weights of the evaluated model at the best validation epoch
``DIR/final.safetensors``    ... at the last epoch
``DIR/history.json``         one record per epoch (clean / robust accuracy, loss, lr, time)
``DIR/summary.json``         best and final metrics, paths
``DIR/curves.png``           clean and robust accuracy per epoch

The weight files hold the state dict of the :class:`~rb_labelrefine.models.NormalizedModel`
(inputs in [0, 1]), with ``arch``, ``num_classes``, ``dataset`` and ``epoch`` in the
safetensors metadata.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

__all__ = ["RUN_FILES", "load_run_config", "load_run_model", "build_model_for", "read_weights",
           "write_weights", "info_from_metadata", "info_to_metadata", "check_name", "load_state_checked",
           "NAME_RE", "NAME_MAX"]

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
    "final": "final.safetensors",
    "history": "history.json",
    "summary": "summary.json",
    "curves": "curves.png",
}


def load_run_config(run_dir):
    from .config import load_config

    path = Path(run_dir) / RUN_FILES["config"]
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run directory: {path} is missing")
    return load_config(str(path))


def build_model_for(cfg, info):
    """Build the (untrained) model a config describes, for the data set ``info`` describes."""
    from .models import build_model

    return build_model(cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
                       image_size=info.image_size, mean=info.mean, std=info.std, **(cfg.model.kwargs or {}))


def write_weights(model: torch.nn.Module, path, metadata: Optional[dict] = None) -> Path:
    """Write a state dict as safetensors, atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    from .training.io import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_weights(path) -> tuple[dict, dict]:
    """Read a safetensors file: ``(state_dict, metadata)``.  Never executes code."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path} is not a valid safetensors file ({exc})") from None
    return state, meta


def check_name(value, field: str) -> str:
    """``value`` if it is a valid model / data-set name (see ``NAME_RE``), else ``ValueError``
    naming ``field``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"{field}: {shown} is not a valid name: it must start with a letter and use only letters, "
                         "digits, '_' and '-' (it becomes a file name and a model-zoo key), e.g. "
                         "'Author2026_Method_Arch'")
    if len(value) > NAME_MAX:
        raise ValueError(f"{field}: the name has {len(value)} characters; at most {NAME_MAX} are allowed")
    return value


def _int_field(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: data_info.{key} must be an integer, got {v!r}"
                         + (" (missing)" if key not in d else ""))
    if not 1 <= v <= _INFO_LIMITS[key]:
        raise ValueError(f"{where}: data_info.{key} must be in [1, {_INFO_LIMITS[key]}], got {v}")
    return v


def _stats_field(d: dict, key: str, channels: int, where: str) -> tuple:
    v = d.get(key)
    if (not isinstance(v, list) or len(v) not in (1, channels)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise ValueError(f"{where}: data_info.{key} must be a list of 1 or {channels} finite numbers, got {v!r}")
    if key == "std" and not all(x > 0 for x in v):
        raise ValueError(f"{where}: data_info.std must be positive, got {v}")
    return tuple(float(x) for x in v)


def info_from_metadata(meta: dict, where: str = "the weights file"):
    """The :class:`~rb_labelrefine.data.DataInfo` a weights file was trained for (stored in its
    metadata, so loading a model never needs the data set).

    The metadata is untrusted input: every field is type- and range-checked and the name is
    checked like a model name; errors name ``where`` (the file) and the field.
    """
    from .data import DataInfo

    if "data_info" not in meta:
        raise ValueError(f"{where} has no 'data_info' metadata (not written by rb_labelrefine?)")
    try:
        d = json.loads(meta["data_info"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: metadata data_info is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: metadata data_info must be a JSON object, got {type(d).__name__}")
    name = check_name(d.get("name"), f"{where}: data_info.name")
    num_classes, channels, image_size = (_int_field(d, k, where) for k in ("num_classes", "channels", "image_size"))
    source = d.get("source", "")
    if not isinstance(source, str):
        raise ValueError(f"{where}: data_info.source must be a string, got {type(source).__name__}")
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
        raise ValueError(f"{where} does not match {arch}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model


def info_to_metadata(info) -> str:
    return json.dumps({"name": info.name, "num_classes": info.num_classes, "channels": info.channels,
                       "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                       "source": getattr(info, "source", "")})


def load_run_model(run_dir, which: str = "best", device="cpu"):
    """Rebuild the model of a run and load its ``best`` or ``final`` weights.

    Returns ``(model, cfg, info)``; the model is in eval mode and takes [0, 1] inputs.
    """
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / RUN_FILES[which]
    state, meta = read_weights(path)
    info = info_from_metadata(meta, str(path))
    model = load_state_checked(build_model_for(cfg, info), state, str(path), cfg.model.arch)
    return model.to(device).eval(), cfg, info
