"""Sources that need no files: scikit-learn's embedded digits and a synthetic pattern set."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import DIGITS_MEAN, DIGITS_STD, SYNTHETIC_MEAN, SYNTHETIC_STD
from .datasets import DataInfo, TensorImageDataset
from .splits import stratified_order

__all__ = ["load_digits_data", "load_synthetic", "DIGITS_NUM_TEST"]

DIGITS_NUM_TEST = 397  # 1,797 images -> 1,400 train / 397 test
_DIGITS_SPLIT_SEED = 0  # fixed: the test set must be the same in every run and every paper table


def load_digits_data():
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside sklearn.

    Pixels (0..16) are scaled to [0, 1]; images are [1, 8, 8]. The train/test split is fixed and
    stratified: 1,400 training and 397 test images.
    """
    from .._optional import require

    d = require("sklearn.datasets", "data", "the digits data set").load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    order = stratified_order(y, _DIGITS_SPLIT_SEED)
    n_train = len(y) - DIGITS_NUM_TEST
    # Sorted so both splits keep sklearn's sample order (stable indices across runs).
    tr, te = order[:n_train].sort().values, order[n_train:].sort().values
    info = DataInfo("digits", 10, 1, 8, DIGITS_MEAN, DIGITS_STD, "sklearn.datasets.load_digits")
    return TensorImageDataset(x[tr], y[tr]), TensorImageDataset(x[te], y[te]), info


def load_synthetic(n_train: int = 256, n_test: int = 128, num_classes: int = 10, channels: int = 3,
                   image_size: int = 32, seed: int = 0):
    """Class-dependent blocky patterns plus uniform noise, in [0, 1]; generated, never downloaded.

    Each class has one random pattern on a coarse grid (upsampled to ``image_size``); an image is
    ``0.7 * pattern + 0.3 * noise``. Linearly separable, so a few-thousand-parameter model learns it
    in a few steps -- it exists for tests and smoke runs, not for measuring robustness.
    """
    if min(n_train, n_test) < 0 or num_classes < 1 or channels < 1 or image_size < 1:
        raise ValueError("load_synthetic needs non-negative sizes and positive classes/channels/image_size")
    g = torch.Generator().manual_seed(seed)
    grid = max(2, image_size // 8)
    patterns = torch.rand(num_classes, channels, grid, grid, generator=g)
    patterns = F.interpolate(patterns, size=(image_size, image_size), mode="nearest")

    def sample(n):
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        noise = torch.rand(n, channels, image_size, image_size, generator=g)
        return TensorImageDataset(0.7 * patterns[y] + 0.3 * noise, y)

    train, test = sample(n_train), sample(n_test)
    info = DataInfo("synthetic", num_classes, channels, image_size, (SYNTHETIC_MEAN,) * channels,
                    (SYNTHETIC_STD,) * channels, f"synthetic(seed={seed})")
    return train, test, info
