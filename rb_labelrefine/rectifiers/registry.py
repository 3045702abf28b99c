"""The method registry: a config names a method, the registry knows its settings and factory.

Each method lives in one module of this package that holds everything about it: its settings
(a small dataclass with the paper's defaults and its own validation), its rectifier, the
factory that builds the rectifier from (settings, :class:`BuildContext`), and what model cards
say about it (label, title, summary, BibTeX).  The module registers itself with
:func:`register_method`, placed right above the factory -- timm's ``@register_model`` shape::

    @register_method("ltd", settings=LTDSettings, label="LTD", title=..., summary=..., bibtex=...)
    def build_ltd(s: LTDSettings, ctx: BuildContext) -> LTD:
        return LTD(ctx.load_teacher(s.teacher, "method.teacher"), ctx.num_classes, temperature=s.temperature)

The trainer calls :func:`build_rectifier` and never branches on a method's name; the config
parses ``method:`` against the chosen method's settings class.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch.nn as nn

from ..errors import ConfigError
from .base import Rectifier

__all__ = ["BuildContext", "MethodSettings", "MethodSpec", "register_method", "get_method", "method_names",
           "build_rectifier", "METHODS"]


@dataclass
class BuildContext:
    """What a factory may use to build its rectifier (the trainer fills it)."""
    model: nn.Module
    num_classes: int
    num_samples: int            # size of the training split (per-sample memories)
    total_steps: int            # optimizer steps of the whole run (annealing schedules)
    steps_per_epoch: int
    decay_scale: Callable[[float], float]   # per-step decay -> decay at this data set's steps/epoch
    load_teacher: Callable[[str, str], nn.Module]  # (path, field name) -> frozen model
    shared_ema: Optional[object] = None     # the WA EMA, offered for reuse as ADR's teacher
    config: Optional[object] = None         # the whole run Config (attack radius, validation steps, seed)


class MethodSettings:
    """Base of every method's settings dataclass.

    ``name`` is the registered name (read-only: set by :func:`register_method`).  Subclasses
    override :meth:`validate` (their own fields), :meth:`check_config` (rules that involve
    other sections) and :meth:`check_runnable` (what only matters when a run starts, e.g. that
    a teacher path was given).  Every error is a :class:`~rb_labelrefine.config.ConfigError`
    naming the field as ``method.<field>``.
    """
    _method_name: str = ""

    @property
    def name(self) -> str:
        return type(self)._method_name

    def validate(self) -> None:
        """Check (and complete) this method's own fields."""

    def check_config(self, cfg) -> None:
        """Rules between this method and the rest of the config (``cfg`` is the whole Config)."""

    def check_runnable(self) -> None:
        """Checks that only matter when a run starts (presets leave teacher paths to fill in)."""

    def card_params(self) -> dict:
        """The parameters a model card shows (default: every field)."""
        return dataclasses.asdict(self)

    # small validators that name the field
    @staticmethod
    def _check(cond: bool, name: str, message: str) -> None:
        if not cond:
            raise ConfigError(f"method.{name}", message)

    def _unit(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            self._check(0.0 <= v <= 1.0, n, f"must be in [0, 1], got {v}")

    def _positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            self._check(v > 0, n, f"must be > 0, got {v}")

    def _choice(self, name: str, options: Iterable[str]) -> None:
        options = list(options)
        v = getattr(self, name)
        self._check(v in options, name, f"must be one of {options}, got {v!r}")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its settings class, factory and what model cards say about it."""
    name: str
    settings: type
    build: Callable[[MethodSettings, BuildContext], Rectifier]
    label: Optional[str]        # short label in model names and cards ('ADR'); None: the objective's label
    title: Optional[str]        # the paper's title (None: no paper, e.g. the one-hot baseline)
    summary: str
    bibtex: Optional[str]

    def field_names(self) -> tuple:
        return tuple(f.name for f in dataclasses.fields(self.settings))


METHODS: Dict[str, MethodSpec] = {}


def register_method(name: str, *, settings: type, label: Optional[str], summary: str,
                    title: Optional[str] = None, bibtex: Optional[str] = None, replace: bool = False):
    """Register the decorated factory ``(settings, BuildContext) -> Rectifier`` under ``name``.

    A second registration of a name is an error (two modules claiming one config name would
    make presets ambiguous) unless ``replace=True``, which warns.
    """
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, MethodSettings)):
        raise TypeError(f"settings of method {name!r} must be a dataclass subclassing MethodSettings")
    if "name" in {f.name for f in dataclasses.fields(settings)}:
        raise TypeError(f"settings of method {name!r} must not have a field 'name' (it is the method's name)")

    def deco(fn):
        if name in METHODS:
            if not replace:
                raise ValueError(f"method {name!r} is already registered by "
                                 f"{METHODS[name].build.__module__}; pass replace=True to override it")
            warnings.warn(f"method {name!r} re-registered: {METHODS[name].build.__module__} -> {fn.__module__}",
                          stacklevel=2)
        settings._method_name = name
        METHODS[name] = MethodSpec(name=name, settings=settings, build=fn, label=label, title=title,
                                   summary=summary, bibtex=bibtex)
        return fn
    return deco


def method_names() -> list:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("method.name", f"unknown method {name!r}; choose one of {method_names()}") from None


def build_rectifier(settings: MethodSettings, ctx: BuildContext) -> Rectifier:
    return get_method(settings.name).build(settings, ctx)
