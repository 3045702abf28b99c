"""Rectifiers: what distribution each batch is trained (and attacked) towards."""
from .adr import ADR, cosine_schedule, rectify
from .base import KDTerm, Rectifier, Target
from .onehot import LabelSmoothing, OneHot
from .sglr import SGLR
from .teachers import KD_WEIGHTS, LTD, KDSelfTeachers

__all__ = ["Rectifier", "Target", "KDTerm", "OneHot", "LabelSmoothing", "ADR", "rectify",
           "cosine_schedule", "SGLR", "LTD", "KDSelfTeachers", "KD_WEIGHTS"]
