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
from pathlib import Path
from typing import Optional

import torch

__all__ = ["RUN_FILES", "load_run_config", "load_run_model", "build_model_for", "read_weights",
           "write_weights", "info_from_metadata", "info_to_metadata"]

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


def info_from_metadata(meta: dict):
    """The :class:`~rb_labelrefine.data.DataInfo` a weights file was trained for (stored in its
    metadata, so loading a model never needs the data set)."""
    from .data import DataInfo

    if "data_info" not in meta:
        raise ValueError("the weights file has no 'data_info' metadata (not written by rb_labelrefine?)")
    d = json.loads(meta["data_info"])
    return DataInfo(name=d["name"], num_classes=int(d["num_classes"]), channels=int(d["channels"]),
                    image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                    source=d.get("source", ""))


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
    state, meta = read_weights(run_dir / RUN_FILES[which])
    info = info_from_metadata(meta)
    model = build_model_for(cfg, info)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{run_dir / RUN_FILES[which]} does not match {cfg.model.arch}: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, info
