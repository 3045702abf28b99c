"""RobustBench's own CIFAR architectures, so trained weights load into its model zoo unchanged.

The classes come from ``robustbench.model_zoo.architectures`` (imported lazily, through
:func:`rb_labelrefine.compat.robustbench.import_robustbench`, which makes ``import robustbench``
work with pyautoattack). Two limits of that code are made explicit here:

* the first conv is hard-wired to 3 input channels: for ``in_channels != 3`` it is replaced by a
  freshly initialised conv of the same shape otherwise (so weights of that one layer no longer
  match RobustBench checkpoints -- fine for training from scratch on greyscale data);
* the final pooling has a fixed kernel (4 for the ResNets, 8 for the WRNs) that assumes 32x32
  inputs, and on other sizes the WRN silently mixes samples in its ``view``. ``image_size`` must
  therefore be 32; use a ``timm:<name>`` model for other sizes (e.g. 64x64 Tiny ImageNet).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .registry import register_model

__all__ = ["Swish", "preact_resnet18", "dm_preact_resnet18", "resnet18", "wrn", "wrn_28_10", "wrn_34_10",
           "wrn_70_16", "robustbench_call", "RobustBenchCall", "ArchRef"]


def _architectures(module: str):
    from ..compat.robustbench import import_robustbench

    import_robustbench()  # registers the autoattack shim robustbench/__init__ needs
    return importlib.import_module(f"robustbench.model_zoo.architectures.{module}")


def _check_size(arch: str, image_size: int) -> None:
    if image_size != 32:
        raise ValueError(
            f"{arch} (RobustBench's CIFAR architecture) needs 32x32 inputs: its final average pool has "
            f"a fixed kernel. Got image_size={image_size}; resize/pad the data to 32 or use a "
            "'timm:<name>' model.")


def _adapt_stem(model: nn.Module, in_channels: int, he_fan_out: bool = False) -> nn.Module:
    if in_channels == 3:
        return model
    old = model.conv1
    model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                            padding=old.padding, bias=old.bias is not None)
    if he_fan_out:  # match WideResNet's own init of every conv (normal, std sqrt(2 / (k*k*out)))
        n = old.kernel_size[0] * old.kernel_size[1] * old.out_channels
        model.conv1.weight.data.normal_(0, math.sqrt(2.0 / n))
    return model


@dataclass(frozen=True)
class ArchRef:
    """A class of the architecture's module passed as an argument (``PreActBlock``, ``BasicBlock``)."""
    name: str


@dataclass(frozen=True)
class RobustBenchCall:
    """How RobustBench's own code builds a network: ``<cls>(*args, **kwargs)`` from
    ``robustbench.model_zoo.architectures.<module>``.

    The registered builders below construct every network through one of these, so a model-zoo
    entry written from it (see :mod:`rb_labelrefine.export`) builds exactly the trained network.
    """
    module: str
    cls: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        m = _architectures(self.module)
        args = [getattr(m, a.name) if isinstance(a, ArchRef) else a for a in self.args]
        return getattr(m, self.cls)(*args, **self.kwargs)


def _preact_call(num_classes: int, **kwargs) -> RobustBenchCall:
    return RobustBenchCall("resnet", "PreActResNet", (ArchRef("PreActBlock"), [2, 2, 2, 2]),
                           {"num_classes": num_classes, **kwargs})


def _resnet_call(num_classes: int) -> RobustBenchCall:
    return RobustBenchCall("resnet", "ResNet", (ArchRef("BasicBlock"), [2, 2, 2, 2]), {"num_classes": num_classes})


def _wrn_call(num_classes: int, depth: int = 28, width: int = 10, widen_factor: Optional[int] = None,
              drop_rate: float = 0.0, **kwargs) -> RobustBenchCall:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 34, 70, ...), got {depth}")
    return RobustBenchCall("wide_resnet", "WideResNet", (),
                           {"depth": depth, "num_classes": num_classes, "widen_factor": widen_factor or width,
                            "dropRate": drop_rate, **kwargs})


def _fixed_wrn(depth: int, width: int):
    return lambda num_classes, **kwargs: _wrn_call(num_classes, depth=depth, width=width, **kwargs)


def _dm_wrn_call(num_classes: int, depth: int = 28, width: int = 10, activation: str = "swish"):
    """RobustBench's ``DMWideResNet(num_classes, depth, width, Swish, mean 0, std 1)`` for
    :mod:`.dm_wide_resnet` (the normalisation is ``normalize_model``'s); swish only -- the ReLU form
    has no activation class in that module to name, so it exports through rb_labelrefine."""
    if activation != "swish":
        return None
    return RobustBenchCall("dm_wide_resnet", "DMWideResNet", (num_classes, depth, width, ArchRef("Swish"),
                                                              [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), {})


def _fixed_dm_wrn(depth: int, width: int):
    return lambda num_classes, **kwargs: _dm_wrn_call(num_classes, depth=depth, width=width, **kwargs)


_CALLS = {"preact_resnet18": _preact_call, "resnet18": _resnet_call, "wrn": _wrn_call,
          "wrn_28_10": _fixed_wrn(28, 10), "wrn_34_10": _fixed_wrn(34, 10), "wrn_70_16": _fixed_wrn(70, 16),
          "dm_wrn": _dm_wrn_call, "dm_wrn_28_10": _fixed_dm_wrn(28, 10), "dm_wrn_70_16": _fixed_dm_wrn(70, 16)}


def robustbench_call(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                     **kwargs) -> Optional[RobustBenchCall]:
    """RobustBench's own constructor call for a registered architecture, or ``None`` when the
    network is not one of RobustBench's (another architecture, or a stem adapted to
    ``in_channels != 3``, or an image size its pooling does not fit)."""
    fn = _CALLS.get(arch)
    if fn is None or in_channels != 3 or image_size != 32:
        return None
    return fn(num_classes, **kwargs)


@register_model
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """PreAct-ResNet-18 (He et al. 2016), RobustBench's ``PreActResNet`` (11.2M params).

    ``kwargs`` (``bn_before_fc``, ``out_shortcut``) go to RobustBench's class, which is ReLU only:
    the ADR code's swish PreAct-ResNet-18 is another network, ``dm_preact_resnet18``.
    """
    if "activation" in kwargs:
        raise ValueError(f"preact_resnet18 (RobustBench's PreActResNet) is ReLU only, got activation="
                         f"{kwargs['activation']!r}; the ADR code's swish PreAct-ResNet-18 is "
                         "model.arch=dm_preact_resnet18")
    _check_size("preact_resnet18", image_size)
    return _adapt_stem(_preact_call(num_classes, **kwargs).build(), in_channels)


class _SwishFn(torch.autograd.Function):
    """x * sigmoid(x) with the hand-written gradient sigmoid(x) * (1 + x * (1 - sigmoid(x))) of the
    ADR / DeepMind code (autograd of x * sigmoid(x) rounds differently in the last bits)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad_output * (s * (1 + x * (1 - s)))


class Swish(nn.Module):
    """Swish / SiLU (Ramachandran et al. 2017) as the ADR code's ``create_model`` builds it."""

    def forward(self, x):
        return _SwishFn.apply(x)


def _activation(arch: str, name: str):
    acts = {"relu": nn.ReLU, "swish": Swish}
    if name not in acts:
        raise ValueError(f"{arch}: activation must be one of {sorted(acts)}, got {name!r}")
    return acts[name]


@register_model
def dm_preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                       activation: str = "relu") -> nn.Module:
    """PreAct-ResNet-18 in DeepMind's form (Gowal et al. 2020), RobustBench's ``DMPreActResNet``
    (12.5M params): the network of the ADR code's ``preact-resnet18``, whose generated-data runs
    use ``activation: swish`` (:class:`Swish`).  It is not ``preact_resnet18``: "SAME" padding by
    hand, 3x3 convolution shortcuts, a final BatchNorm -- and other state-dict keys (``conv_2d``,
    ``layer_0.0.batchnorm_0``, ..., ``logits``: those of RobustBench's DM models).  Normalisation
    is the package's wrapper's, so the class's own mean / std are 0 / 1 (not in the state dict).
    The activation is this module's :class:`Swish`, so it has no :func:`robustbench_call` entry.
    """
    _check_size("dm_preact_resnet18", image_size)
    m = _architectures("dm_wide_resnet")
    act = _activation("dm_preact_resnet18", activation)
    return m.DMPreActResNet(num_classes=num_classes, depth=18, activation_fn=act, mean=(0.0,) * in_channels,
                            std=(1.0,) * in_channels, num_input_channels=in_channels)


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18 in its CIFAR form (3x3 stem, no max-pool), RobustBench's ``ResNet`` (11.2M params)."""
    _check_size("resnet18", image_size)
    return _adapt_stem(_resnet_call(num_classes).build(), in_channels)


@register_model
def wrn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 28, width: int = 10,
        widen_factor: Optional[int] = None, drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """WideResNet-``depth``-``width`` (Zagoruyko & Komodakis 2016), RobustBench's ``WideResNet``.

    ``width`` is RobustBench's ``widen_factor`` (either name works); ``depth`` must be 6n+4.
    Other ``kwargs`` (``sub_block1``, ``bias_last``) go to RobustBench's class.
    """
    _check_size(f"wrn-{depth}-{widen_factor or width}", image_size)
    net = _wrn_call(num_classes, depth=depth, width=width, widen_factor=widen_factor, drop_rate=drop_rate,
                    **kwargs).build()
    return _adapt_stem(net, in_channels, he_fan_out=True)


@register_model
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """WRN-28-10 (36.5M params)."""
    return wrn(num_classes, in_channels, image_size, depth=28, width=10, **kwargs)


@register_model
def wrn_34_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """WRN-34-10 (46.2M params), the usual CIFAR-10 adversarial-training benchmark network."""
    return wrn(num_classes, in_channels, image_size, depth=34, width=10, **kwargs)


@register_model
def wrn_70_16(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """WRN-70-16 (267M params)."""
    return wrn(num_classes, in_channels, image_size, depth=70, width=16, **kwargs)
