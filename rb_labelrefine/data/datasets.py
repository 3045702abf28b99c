"""Dataset containers: an in-memory image set, an index-returning wrapper, batch validation."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

__all__ = ["DataInfo", "TensorImageDataset", "IndexedDataset", "RandomCropFlip", "validate_batch"]


@dataclass(frozen=True)
class DataInfo:
    """What a model and an evaluator need to know about a data set.

    ``mean``/``std`` are the normalisation constants for :class:`~rb_labelrefine.models.NormalizedModel`;
    the datasets themselves always return raw pixels in [0, 1], as RobustBench and AutoAttack expect.
    ``source`` says where the images came from (a path or a generator), for run records.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    source: str


class RandomCropFlip:
    """Zero-pad, take a random crop of the original size, and flip horizontally with p=0.5.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``)
    written on [C, H, W] tensors, so it needs no PIL round trip and draws from torch's global
    RNG: seeding torch (and DataLoader worker seeding) makes it reproducible.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"RandomCropFlip expects one [C, H, W] image, got shape {tuple(x.shape)}")
        p = self.padding
        if p:
            h, w = x.shape[-2:]
            x = torch.nn.functional.pad(x, (p, p, p, p))
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, i:i + h, j:j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, returned as float [C, H, W] pixels in [0, 1].

    Args:
        x: [N, C, H, W] float in [0, 1], or uint8 in [0, 255]. Large sets (CIFAR, TinyImageNet)
            are kept as uint8 -- four times less memory -- and converted one item at a time.
        y: [N] integer class labels.
        transform: optional callable applied to each float image (train-time augmentation).
    """

    def __init__(self, x: Tensor, y: Tensor, transform: Optional[Callable[[Tensor], Tensor]] = None):
        if x.dim() != 4:
            raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"x must be float in [0, 1] or uint8, got dtype {x.dtype}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must be [N] with N={len(x)}, got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
        self.x = x
        self.y = y.long()
        self.transform = transform

    @property
    def targets(self) -> Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i]

    def with_transform(self, transform) -> "TensorImageDataset":
        """A view sharing the same storage with a different transform (train vs. val split)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def tensors(self, indices: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
        """Float images and labels as whole tensors (no transform), e.g. for AutoAttack."""
        idx = slice(None) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        x = self.x[idx]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        return x, self.y[idx]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset of ``(x, y)`` so it yields ``(x, y, index)``.

    Per-sample rectifiers (SGLR's label memory, for one) need to know which sample each batch row
    is. ``index`` is the position in the *wrapped* dataset -- for a ``Subset`` that is
    0..len(subset)-1, not the index into the subset's parent -- so it can address a memory tensor
    of size ``len(dataset)`` directly.

    Everything else is the wrapped dataset's: attribute reads the wrapper does not answer itself
    go to it (``ds.classes``, ``ds.transform``, a training script's own methods such as locuslab's
    ``set_random_choices()``), and assigning an attribute the wrapped dataset has (but the wrapper
    does not) sets it there (``ds.transform = ...`` changes what the loader yields).
    """

    def __init__(self, dataset: Dataset):
        object.__setattr__(self, "dataset", dataset)

    def __getattr__(self, name):
        # only called when normal lookup fails; never for dunders (copy/pickle probe those on
        # half-built objects) and never before ``dataset`` is set
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            dataset = self.__dict__["dataset"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(dataset, name)

    def __setattr__(self, name, value):
        d = self.__dict__
        if (name != "dataset" and "dataset" in d and name not in d and not hasattr(type(self), name)
                and hasattr(d["dataset"], name)):
            setattr(d["dataset"], name, value)
        else:
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, i

    @property
    def targets(self) -> Tensor:
        """All labels in index order, without loading (or augmenting) any image when avoidable."""
        return _targets_of(self.dataset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, dataset={type(self.dataset).__name__})"


def _targets_of(ds) -> Tensor:
    if isinstance(ds, Subset):
        return _targets_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, IndexedDataset):
        return _targets_of(ds.dataset)
    t = getattr(ds, "targets", None)
    if t is not None:
        return torch.as_tensor(t, dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def validate_batch(x: Tensor, y: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` naming what is wrong with an (inputs, labels) batch.

    Checks rank ([N, C, H, W] inputs, [N] labels), integer labels in [0, num_classes), and finite
    inputs in [0, 1] (models here normalise internally, so normalised or 0-255 inputs are a bug).
    The value checks cost one min/max reduction per tensor and a single device sync; the precise
    diagnosis (NaN vs. Inf vs. out of range) is computed only once something is known to be wrong.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"expected tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4:
        raise ValueError(f"inputs must have rank 4 [N, C, H, W], got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise ValueError(f"labels must have rank 1 [N] (class indices), got shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"batch size mismatch: {len(x)} inputs vs {len(y)} labels")
    if len(x) == 0:
        raise ValueError("empty batch")
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point in [0, 1], got dtype {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")

    # One reduction per tensor, one host transfer; NaN propagates through aminmax.
    stats = torch.stack([t.double() for t in (*torch.aminmax(x.detach()), *torch.aminmax(y.detach()))])
    x_min, x_max, y_min, y_max = stats.tolist()
    y_min, y_max = int(y_min), int(y_max)
    if y_min < 0 or y_max >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{y_min}, {y_max}]")
    if not (0.0 <= x_min and x_max <= 1.0):  # also false for NaN
        if torch.isnan(x).any():
            raise ValueError(f"inputs contain NaN ({int(torch.isnan(x).sum())} values)")
        if torch.isinf(x).any():
            raise ValueError(f"inputs contain Inf ({int(torch.isinf(x).sum())} values)")
        raise ValueError(
            f"inputs must be pixels in [0, 1], got values in [{x_min:.4g}, {x_max:.4g}] "
            "(pass unnormalised images; the model wrapper normalises)")
