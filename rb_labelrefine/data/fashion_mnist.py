"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` or torchvision's layout)."""
from __future__ import annotations

from pathlib import Path

import torch

from .constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .datasets import DataInfo, TensorImageDataset
from .errors import CorruptDatasetError, DatasetNotFoundError
from .idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

__all__ = ["load_fashion_mnist", "FASHION_MNIST_ROOT"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where apt-get install dataset-fashion-mnist puts it
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _candidate_dirs(root: Path):
    # The folder itself, then torchvision's ``FashionMNIST/raw`` download layout beneath it.
    return [root, root / "FashionMNIST" / "raw"]


def _find(root: Path, stem: str, looked_at: list):
    for d in _candidate_dirs(root):
        for name in (stem, stem + ".gz"):
            p = d / name
            looked_at.append(p)
            if p.is_file():
                return p
    return None


def _load_split(images_path: Path, labels_path: Path) -> TensorImageDataset:
    x = read_idx(images_path, IDX_IMAGES_MAGIC)
    y = read_idx(labels_path, IDX_LABELS_MAGIC)
    if x.shape[1:] != (28, 28):
        raise CorruptDatasetError(images_path, f"images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
    if len(x) != len(y):
        raise CorruptDatasetError(labels_path, f"{len(y)} labels for {len(x)} images in {images_path.name}")
    if len(y) and int(y.max()) > 9:
        raise CorruptDatasetError(labels_path, f"label {int(y.max())} outside the 10 classes 0..9")
    # Kept as uint8 (47 MB instead of 188 MB); TensorImageDataset scales to [0, 1] per item.
    return TensorImageDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long())


def load_fashion_mnist(root=FASHION_MNIST_ROOT):
    """Fashion-MNIST (60,000 train / 10,000 test, 10 classes) as [N, 1, 28, 28] pixels in [0, 1].

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, raw or ``.gz``, from ``root`` or ``root/FashionMNIST/raw``.

    Raises:
        DatasetNotFoundError: a file is missing (the message lists every path looked at).
        CorruptDatasetError: a file is truncated or has the wrong magic number, shape or count.
    """
    root = Path(root).expanduser()
    looked_at, paths = [], {}
    for stems in _FILES.values():
        for stem in stems:
            paths[stem] = _find(root, stem, looked_at)
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFoundError(
            "Fashion-MNIST", looked_at,
            f"Missing: {', '.join(missing)}. Install it with `apt-get install dataset-fashion-mnist` "
            f"(files go to {FASHION_MNIST_ROOT}), or point to a folder holding the IDX files with "
            "root=... (config: data.root).")
    train = _load_split(paths[_FILES["train"][0]], paths[_FILES["train"][1]])
    test = _load_split(paths[_FILES["test"][0]], paths[_FILES["test"][1]])
    source = str(paths[_FILES["train"][0]].parent)
    info = DataInfo("fashion_mnist", 10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, source)
    return train, test, info
