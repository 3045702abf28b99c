"""Tiny ImageNet (200 classes, 64x64) from the standard ``tiny-imagenet-200`` folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .constants import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD
from .datasets import DataInfo, TensorImageDataset
from .errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["load_tiny_imagenet", "TINY_IMAGENET_URL"]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_FOLDER = "tiny-imagenet-200"
_SIZE = 64


def _read_image(path: Path) -> np.ndarray:
    from .._optional import require

    Image = require("PIL.Image", "vision", "reading Tiny ImageNet's JPEG files")

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))  # a few Tiny ImageNet images are greyscale
    except OSError as e:
        raise CorruptDatasetError(path, f"unreadable image ({e})") from e
    if arr.shape != (_SIZE, _SIZE, 3):
        raise CorruptDatasetError(path, f"image is {arr.shape[1]}x{arr.shape[0]}, expected {_SIZE}x{_SIZE}")
    return arr


def _stack(paths, labels) -> TensorImageDataset:
    x = np.stack([_read_image(p) for p in paths]) if paths else np.zeros((0, _SIZE, _SIZE, 3), np.uint8)
    # uint8 storage: 100,000 images are 1.2 GB as bytes, 4.9 GB as float32.
    return TensorImageDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                              torch.as_tensor(labels, dtype=torch.long))


def load_tiny_imagenet(root="./data"):
    """Tiny ImageNet as ``(train, test, info)``; the labelled ``val`` split serves as the test set.

    ``root`` is the ``tiny-imagenet-200`` folder or its parent. Classes are indexed in the order of
    ``wnids.txt`` (sorted train folder names if it is absent). Train images are read from
    ``train/<wnid>/images/*.JPEG``, test images from ``val/images`` with labels from
    ``val/val_annotations.txt``. Decoding 110,000 JPEGs takes a minute or two on a few cores.
    """
    root = Path(root).expanduser()
    candidates = [root, root / _FOLDER]
    folder = next((d for d in candidates if (d / "train").is_dir() and (d / "val" / "val_annotations.txt").is_file()), None)
    if folder is None:
        raise DatasetNotFoundError(
            "Tiny ImageNet", [p for d in candidates for p in (d / "train", d / "val" / "val_annotations.txt")],
            f"Download {TINY_IMAGENET_URL}, unzip it and pass the folder (or its parent) as root "
            "(config: data.root).")

    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    else:
        wnids = sorted(d.name for d in (folder / "train").iterdir() if d.is_dir())
    class_of = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for w in wnids:
        imgs = sorted((folder / "train" / w / "images").glob("*.JPEG"))
        if not imgs:
            raise CorruptDatasetError(folder / "train" / w / "images", "no *.JPEG images for this class")
        train_paths += imgs
        train_labels += [class_of[w]] * len(imgs)

    ann = folder / "val" / "val_annotations.txt"
    test_paths, test_labels = [], []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in class_of:
            raise CorruptDatasetError(ann, f"line {lineno}: expected '<file>\\t<wnid>...' with a known wnid, got {line!r}")
        test_paths.append(folder / "val" / "images" / fields[0])
        test_labels.append(class_of[fields[1]])

    info = DataInfo("tiny_imagenet", len(wnids), 3, _SIZE, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, str(folder))
    return _stack(train_paths, train_labels), _stack(test_paths, test_labels), info
