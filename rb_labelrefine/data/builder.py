"""``build_datasets``: one call from a data-set name to indexed train / val / test splits."""
from __future__ import annotations

from typing import Callable, Optional, Union

from torch.utils.data import Subset

from .builtin import load_digits_data, load_synthetic
from .cifar import load_cifar
from .datasets import IndexedDataset, RandomCropFlip
from .fashion_mnist import FASHION_MNIST_ROOT, load_fashion_mnist
from .splits import stratified_order
from .tiny_imagenet import load_tiny_imagenet
from ..errors import ConfigError
from .imagenet import DEFAULT_IMAGE_SIZE, ImageNetTrain, load_imagenet

__all__ = ["build_datasets", "load_source", "DATASET_NAMES"]

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "synthetic", "imagenet")
_TEST_SUBSET_SEED = 0  # the evaluation subset does not move with the split seed: runs stay comparable


def load_source(name: str, root: Optional[str] = None, **kwargs):
    """``(train, test, info)`` of a named source; ``root=None`` uses the source's default location."""
    if name == "digits":
        return load_digits_data(**kwargs)
    if name == "synthetic":
        return load_synthetic(**kwargs)
    if name == "fashion_mnist":
        return load_fashion_mnist(root or FASHION_MNIST_ROOT, **kwargs)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root or "./data", name=name, **kwargs)
    if name == "tiny_imagenet":
        return load_tiny_imagenet(root or "./data", **kwargs)
    if name == "imagenet":   # an ImageFolder tree, decoded lazily (rb_labelrefine/data/imagenet.py)
        return load_imagenet(root or "./data", **kwargs)
    raise ConfigError("data.name", f"unknown data set {name!r}; choose one of {list(DATASET_NAMES)}")


def build_datasets(name: str, root: Optional[str] = None, val_fraction: float = 0.1,
                   train_subset: Optional[int] = None, augment: Union[bool, Callable] = False,
                   seed: int = 0, test_subset: Optional[int] = None, image_size: Optional[int] = None,
                   **source_kwargs):
    """Load a data set and split it into ``(train_ds, val_ds, test_ds, info)``.

    Args:
        name: one of ``DATASET_NAMES``.
        root: where the files are (``None``: the source's default).
        val_fraction: share of the training images held out to select the best checkpoint
            (KD+SWA uses a 9:1 split). ``0`` gives an empty ``val_ds``.
        train_subset: keep only this many of the remaining training images (small-data robust
            overfitting experiments use 500 or 1,000). The subset is stratified and the validation
            split does not depend on it.
        augment: ``True`` applies ``RandomCropFlip(padding=4)`` (the CIFAR recipe) to the training
            split only; a callable is used as the training transform instead.
        seed: seeds the validation/subset split (independent of the training seed).
        test_subset: evaluate on a fixed, stratified subset of this many test images (fixed
            regardless of ``seed``, so runs with different seeds are scored on the same images).
        **source_kwargs: passed to the loader (e.g. ``n_train=`` for ``synthetic``).

    Every returned dataset is an :class:`IndexedDataset` yielding ``(x, y, idx)`` with ``idx`` in
    ``0..len(ds)-1``; images are [C, H, W] floats in [0, 1].
    """
    if name not in DATASET_NAMES:
        raise ConfigError("data.name", f"unknown data set {name!r}; choose one of {list(DATASET_NAMES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {val_fraction}")
    if name == "imagenet":   # data.image_size: the crop size (RandomResizedCrop / Res256Crop224 scaled)
        source_kwargs["image_size"] = image_size or DEFAULT_IMAGE_SIZE
        if augment is True:
            augment = ImageNetTrain(source_kwargs["image_size"])
    elif name == "synthetic" and image_size is not None:   # generated: any size
        source_kwargs["image_size"] = image_size
    elif image_size is not None:
        raise ConfigError("data.image_size", f"applies to imagenet and synthetic only (the {name} images have their "
                          "own size)")
    train, test, info = load_source(name, root, **source_kwargs)

    order = stratified_order(train.targets, seed)
    n_val = int(round(val_fraction * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_idx):
            raise ConfigError("data.train_subset", f"{train_subset}, but only {len(train_idx)} training images "
                             f"remain after holding out {n_val} for validation")
        train_idx = train_idx[:train_subset]

    transform = augment if callable(augment) else (RandomCropFlip(padding=4) if augment else None)
    train_ds = IndexedDataset(Subset(train.with_transform(transform), train_idx.tolist()))
    val_ds = IndexedDataset(Subset(train, val_idx.tolist()))

    if test_subset is not None:
        if not 1 <= test_subset <= len(test):
            raise ConfigError("data.test_subset", f"{test_subset}, but the test set has {len(test)} images")
        test_idx = stratified_order(test.targets, _TEST_SUBSET_SEED)[:test_subset].sort().values
        test = Subset(test, test_idx.tolist())
    return train_ds, val_ds, IndexedDataset(test), info
