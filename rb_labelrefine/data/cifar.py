"""CIFAR-10/100 from the official python-pickle batches, read without executing pickle code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from .datasets import DataInfo, TensorImageDataset
from .errors import CorruptDatasetError, DatasetNotFoundError
from .safe_pickle import safe_load_pickle

__all__ = ["load_cifar", "CIFAR_URL"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# name -> (extracted folder, train files, test files, label key, classes, mean, std, archive)
_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10, CIFAR10_MEAN, CIFAR10_STD, "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"],
                 "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD, "cifar-100-python.tar.gz"),
}


def _str_keys(d: dict) -> dict:
    # encoding="bytes" gives bytes keys (b"data"); a re-saved file may have str keys. Accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: Path, label_key: str, num_classes: int):
    batch = safe_load_pickle(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise CorruptDatasetError(path, f"expected a dict, got {type(batch).__name__}")
    batch = _str_keys(batch)
    if "data" not in batch or label_key not in batch:
        raise CorruptDatasetError(path, f"missing key 'data' or '{label_key}' (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CorruptDatasetError(path, f"'data' must be a uint8 array of shape [N, 3072], got {desc}")
    labels = batch[label_key]
    # a flat list of ints (the official files) or a 1-D integer array, checked before numpy sees it
    # (np.asarray of a list of shared lists would expand them)
    if isinstance(labels, list):
        if len(labels) != len(data) or not all(type(v) is int for v in labels):
            raise CorruptDatasetError(path, f"'{label_key}' must be a list of {len(data)} integers")
        labels = np.asarray(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise CorruptDatasetError(path, f"'{label_key}' must be {len(data)} integers, got {type(labels).__name__}")
    if labels.shape != (len(data),):
        raise CorruptDatasetError(path, f"'{label_key}' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDatasetError(path, f"labels outside 0..{num_classes - 1}")
    # Rows are 1024 red, then green, then blue values, each 32x32 row-major: exactly [3, 32, 32].
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, files, label_key, num_classes) -> TensorImageDataset:
    parts = [_read_batch(folder / f, label_key, num_classes) for f in files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    return TensorImageDataset(x, y)  # uint8 storage, [0, 1] floats per item


def load_cifar(root="./data", name: str = "cifar10"):
    """CIFAR-10 or CIFAR-100 from a local copy of the python version of the data set.

    ``root`` may be the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the
    folder that contains it -- robustbench's and torchvision's ``data_dir``/``root`` convention.
    The pickles are read with a restricted unpickler that only rebuilds numpy arrays.
    Returns ``(train, test, info)`` with [N, 3, 32, 32] images; CIFAR-100 uses the fine labels.
    """
    if name not in _LAYOUTS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose 'cifar10' or 'cifar100'")
    folder_name, train_files, test_files, label_key, num_classes, mean, std, archive = _LAYOUTS[name]
    root = Path(root).expanduser()
    looked_at = []
    for folder in (root, root / folder_name):
        wanted = [folder / f for f in train_files + test_files]
        if all(p.is_file() for p in wanted):
            break
        looked_at += [p for p in wanted if not p.is_file()] if folder.is_dir() else [folder]
    else:
        tarball = next((p for p in (root / archive, root.parent / archive) if p.is_file()), None)
        hint = (f"Found the archive {tarball}: extract it with `tar xzf {tarball} -C {tarball.parent}`.\n"
                if tarball else "")
        raise DatasetNotFoundError(
            name.upper().replace("CIFAR", "CIFAR-"), looked_at,
            hint + f"Download the python version ({archive}) from {CIFAR_URL} and extract it into root "
            f"(config: data.root). When online, robustbench's load_{name}(data_dir=...) also downloads it.")
    train = _read_split(folder, train_files, label_key, num_classes)
    test = _read_split(folder, test_files, label_key, num_classes)
    info = DataInfo(name, num_classes, 3, 32, mean, std, str(folder))
    return train, test, info
