"""DeepMind's WideResNet (Gowal et al. 2020), the network of the top CIFAR RobustBench entries.

Wang et al. 2023 (github:wzekai99/DM-Improves-AT, ``core/models/wideresnetwithswish.py``) train
WRN-28-10 and WRN-70-16 with swish; RobustBench builds the published weights with its
``robustbench.model_zoo.architectures.dm_wide_resnet.DMWideResNet`` (model zoo entries
``Wang2023Better_WRN-28-10`` / ``_WRN-70-16``).  This module is written from those two
descriptions (no code copied) so that:

* the state-dict keys and shapes are RobustBench's (``init_conv``, ``layer.<g>.block.<i>.
  batchnorm_0 / conv_0 / batchnorm_1 / conv_1 / shortcut``, ``batchnorm``, ``logits``): exported
  weights load into RobustBench's own class (``tests/test_dm_recipe.py`` checks keys, shapes and
  outputs against the installed robustbench);
* training matches the DM-Improves-AT code: BatchNorm momentum 0.01 (Haiku's decay 0.99), the
  code's initialisation (convolutions N(0, 2 / (k*k*out)), BatchNorm 1 / 0, linear bias 0),
  "SAME" padding written by hand (pad 1 on every side for stride 1, right/bottom only for stride
  2), the pre-activation of a block with a 1x1 shortcut feeding both branches.

Input normalisation is the package's wrapper's (:class:`NormalizedModel`), so the network itself
has none (RobustBench's class is built with mean 0 / std 1 and its ``normalize_model`` layer holds
the statistics).  ``activation="swish"`` is x * sigmoid(x) with the DeepMind code's hand-written
gradient -- the forward of RobustBench's ``dm_wide_resnet.Swish``, so the exported entry computes
the same function bit for bit; the DM-Improves-AT code's ``nn.SiLU`` computes the same function
(rounding may differ in the last bit).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .robustbench_archs import Swish, _check_size

__all__ = ["DMWideResNet", "dm_wrn", "dm_wrn_28_10", "dm_wrn_70_16", "DM_BN_MOMENTUM"]

DM_BN_MOMENTUM = 0.01   # Haiku's BatchNorm decay 0.99, as in the DeepMind / DM-Improves-AT code

_ACTS = {"swish": Swish, "relu": nn.ReLU}


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"dm_wrn: activation must be one of {sorted(_ACTS)}, got {name!r}")
    return _ACTS[name]()


def _same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding for a 3x3 kernel."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ValueError(f"unsupported stride {stride}")


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(c_in, momentum=DM_BN_MOMENTUM)
        self.relu_0 = _act(activation)
        self.conv_0 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(c_out, momentum=DM_BN_MOMENTUM)
        self.relu_1 = _act(activation)
        self.conv_1 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x):
        pre = self.relu_0(self.batchnorm_0(x))
        # with a projection shortcut the pre-activated input feeds both branches; without, the
        # identity branch carries the raw input
        skip = self.shortcut(pre) if self.has_shortcut else x
        out = self.conv_0(_same_pad(pre, self._stride))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return skip + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.block = nn.Sequential(*[_Block(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, activation)
                                     for i in range(n)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-``depth``-``width`` in DeepMind's form (depth = 6n + 4).  Takes normalised inputs."""

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "swish",
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"dm_wrn: depth must be 6n+4 (10, 16, 22, 28, 34, 70, ...), got {depth}")
        if width < 1:
            raise ValueError(f"dm_wrn: width must be >= 1, got {width}")
        _act(activation)
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width, self.activation = depth, width, activation
        self.init_conv = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(_BlockGroup(n, ch[0], ch[1], 1, activation),
                                   _BlockGroup(n, ch[1], ch[2], 2, activation),
                                   _BlockGroup(n, ch[2], ch[3], 2, activation))
        self.batchnorm = nn.BatchNorm2d(ch[3], momentum=DM_BN_MOMENTUM)
        self.relu = _act(activation)
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]
        for m in self.modules():  # the DM-Improves-AT code's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.layer(self.init_conv(x))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 8)   # 8x8 maps for 32x32 inputs, as in both codes
        return self.logits(out.view(-1, self.num_channels))


@register_model
def dm_wrn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 28, width: int = 10,
           activation: str = "swish") -> nn.Module:
    """DeepMind's WideResNet (Gowal et al. 2020; Wang et al. 2023's network), swish by default."""
    _check_size(f"dm_wrn-{depth}-{width}", image_size)
    return DMWideResNet(num_classes, depth=depth, width=width, activation=activation, in_channels=in_channels)


@register_model
def dm_wrn_28_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """WRN-28-10, swish, DeepMind form (36.5M params): RobustBench's ``Wang2023Better_WRN-28-10``."""
    return dm_wrn(num_classes, in_channels, image_size, depth=28, width=10, **kwargs)


@register_model
def dm_wrn_70_16(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """WRN-70-16, swish, DeepMind form (267M params): RobustBench's ``Wang2023Better_WRN-70-16``."""
    return dm_wrn(num_classes, in_channels, image_size, depth=70, width=16, **kwargs)
