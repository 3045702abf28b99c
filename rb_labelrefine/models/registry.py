"""Name -> architecture registry (timm style), plus ``timm:<name>`` for any timm model."""
from __future__ import annotations

import fnmatch
from typing import Callable, Optional

from torch import nn

__all__ = ["register_model", "list_models", "is_model", "create_model", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"
_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None):
    """Register ``fn(num_classes, in_channels, image_size, **kwargs) -> nn.Module`` under its name.

    Usable as ``@register_model`` or ``@register_model(name="my_net")``; configs then name it in
    ``model.arch``.
    """
    def deco(f):
        key = name or f.__name__
        if key.startswith(TIMM_PREFIX):
            raise ValueError(f"model names may not start with {TIMM_PREFIX!r}")
        if key in _model_entrypoints and _model_entrypoints[key] is not f:
            raise ValueError(f"a model named {key!r} is already registered")
        _model_entrypoints[key] = f
        return f

    return deco(fn) if fn is not None else deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern (timm models: ``timm.list_models``)."""
    return sorted(n for n in _model_entrypoints if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _model_entrypoints or name.startswith(TIMM_PREFIX)


def _create_timm(name: str, num_classes: int, in_channels: int, image_size: Optional[int] = None,
                 **kwargs) -> nn.Module:
    from .._optional import require

    timm = require("timm", "timm", f"the model 'timm:{name}'")

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        raise ValueError(f"timm has no model {name!r}" + (f"; similar: {close}" if close else ""))
    # pretrained=False unless asked: there is no network here, and silently downloading
    # ImageNet weights would change what "training from scratch" means.
    kwargs.setdefault("pretrained", False)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **kwargs)
    # Patch-embedding models (ViT, DeiT, ...) are built for one input size and fail deep inside
    # their forward on another; say it here, with the fix.
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size is not None and fixed is not None and tuple(fixed) != (image_size, image_size) \
            and not getattr(model.patch_embed, "dynamic_img_size", False):
        raise ValueError(f"timm:{name} is built for {fixed[0]}x{fixed[1]} inputs, the data are "
                         f"{image_size}x{image_size}: set model.kwargs.img_size={image_size} (e.g. "
                         f"--set model.kwargs.img_size={image_size}; patch size must divide it)")
    return model


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build an (unnormalised) network by registry name, or any timm model as ``timm:<name>``.

    ``kwargs`` go to the architecture (e.g. ``depth``/``widen_factor`` for ``wrn``, ``img_size``
    or ``pretrained=True`` for timm). timm models adapt to ``in_channels`` themselves; the image
    size is not passed to timm, since only some of its models (ViTs) take ``img_size``.
    """
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX):], num_classes, in_channels, image_size, **kwargs)
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()} "
                         f"(or '{TIMM_PREFIX}<name>' for any timm model)")
    return _model_entrypoints[name](num_classes=num_classes, in_channels=in_channels,
                                    image_size=image_size, **kwargs)
