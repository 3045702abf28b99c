"""Rectifiers: what distribution each batch is trained (and attacked) towards.

One module per method (settings, rectifier, registration, citation); importing this package
imports every module in it, so a method's file registers itself -- adding a method is adding
its file (and its tests and presets), nothing else.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import KDTerm, Rectifier, Target
from .registry import BuildContext, MethodSettings, build_rectifier, get_method, method_names, register_method
from .onehot import OneHot  # registration order = the order method_names() lists
from .label_smoothing import LabelSmoothing
from .adr import ADR, cosine_schedule, rectify
from .sglr import SGLR
from .ltd import LTD
from .kd import KD_WEIGHTS, KDSelfTeachers

for _mod in _pkgutil.iter_modules(__path__):  # methods without a public name above register too
    _importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Rectifier", "Target", "KDTerm", "OneHot", "LabelSmoothing", "ADR", "rectify",
           "cosine_schedule", "SGLR", "LTD", "KDSelfTeachers", "KD_WEIGHTS", "BuildContext", "MethodSettings",
           "register_method", "get_method", "method_names", "build_rectifier"]
