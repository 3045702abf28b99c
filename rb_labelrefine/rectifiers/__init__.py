"""Rectifiers: what distribution each batch is trained (and attacked) towards.

One module per method (settings, rectifier, registration, citation); importing this package
registers the built-in methods.
"""
from .base import KDTerm, Rectifier, Target
from .registry import BuildContext, MethodSettings, build_rectifier, get_method, method_names, register_method
from .onehot import OneHot  # noqa: E402  (registration order = the order `method_names()` lists)
from .label_smoothing import LabelSmoothing
from .adr import ADR, cosine_schedule, rectify
from .sglr import SGLR
from .ltd import LTD
from .kd import KD_WEIGHTS, KDSelfTeachers

__all__ = ["Rectifier", "Target", "KDTerm", "OneHot", "LabelSmoothing", "ADR", "rectify",
           "cosine_schedule", "SGLR", "LTD", "KDSelfTeachers", "KD_WEIGHTS", "BuildContext", "MethodSettings",
           "register_method", "get_method", "method_names", "build_rectifier"]
