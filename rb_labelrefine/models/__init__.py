"""Models: a normalising wrapper (every model takes [0, 1] pixels, as RobustBench requires) and a
registry of architectures -- small CNNs for the offline data sets, RobustBench's own ResNet /
PreAct-ResNet / WideResNet code, any timm model as ``timm:<name>``, and any user ``nn.Module``.
"""
from .factory import build_model, count_parameters
from .normalize import NormalizedModel, wrap_module
from .registry import TIMM_PREFIX, create_model, is_model, list_models, register_model
from . import small, robustbench_archs, dm_wide_resnet  # noqa: F401  (register the built-in architectures)

__all__ = [
    "NormalizedModel", "wrap_module", "build_model", "count_parameters",
    "register_model", "list_models", "is_model", "create_model", "TIMM_PREFIX",
]
