"""Data sources for label-refinement adversarial training.

Every dataset returns raw pixels in [0, 1] ([C, H, W] floats) -- normalisation lives in the model
(:class:`rb_labelrefine.models.NormalizedModel`), as RobustBench and AutoAttack require -- and
:func:`build_datasets` wraps each split in :class:`IndexedDataset` so batches carry the sample
index that per-sample rectifiers (SGLR) need.

Offline sources: scikit-learn's embedded digits, Fashion-MNIST IDX files, synthetic patterns.
User-supplied: CIFAR-10/100 (python pickle batches) and Tiny ImageNet (image folders).
"""
from .builder import DATASET_NAMES, build_datasets, load_source
from .builtin import load_digits_data, load_synthetic
from .cifar import CIFAR_URL, load_cifar
from .constants import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DIGITS_MEAN, DIGITS_STD,
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD,
)
from .datasets import DataInfo, IndexedDataset, RandomCropFlip, TensorImageDataset, validate_batch
from .errors import CorruptDatasetError, DatasetNotFoundError, UnsafePickleError
from .fashion_mnist import FASHION_MNIST_ROOT, load_fashion_mnist
from .idx import read_idx
from .safe_pickle import RestrictedUnpickler, safe_load_pickle
from .splits import stratified_order
from .tiny_imagenet import load_tiny_imagenet

__all__ = [
    "DataInfo", "IndexedDataset", "TensorImageDataset", "RandomCropFlip", "validate_batch",
    "build_datasets", "load_source", "DATASET_NAMES",
    "load_digits_data", "load_fashion_mnist", "load_cifar", "load_tiny_imagenet", "load_synthetic",
    "DatasetNotFoundError", "CorruptDatasetError", "UnsafePickleError",
    "read_idx", "RestrictedUnpickler", "safe_load_pickle", "stratified_order",
    "FASHION_MNIST_ROOT", "CIFAR_URL",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "TINY_IMAGENET_MEAN",
    "TINY_IMAGENET_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "DIGITS_MEAN", "DIGITS_STD",
]
