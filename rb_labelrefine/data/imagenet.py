"""ImageNet (ILSVRC-2012) from the ImageFolder layout, decoded one image at a time.

Layout (``data.root``)::

    ROOT/train/<wnid>/<image>      e.g. ROOT/train/n01440764/n01440764_10026.JPEG
    ROOT/val/<wnid>/<image>        e.g. ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG

Classes are the sorted ``train`` folder names (for the full data set: ImageNet's 1000 wnids in
the order of RobustBench's ``imagenet_class_to_id_map.json``).  Only paths and labels are held
(a numpy byte-string array: no per-item Python objects, so forked DataLoader workers do not copy
it page by page); every item is read, decoded and transformed when it is fetched, so memory does
not grow with the data set and ``data.num_workers`` parallelises decoding.

Transforms (PIL, written here after torchvision's definitions, checked equal to them in the
tests when torchvision is installed):

* training (``data.augment``): ``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3,
  bilinear) and a horizontal flip with p = 0.5, drawing from torch's global RNG;
* evaluation: RobustBench's ``Res256Crop224`` -- resize the shorter side to 256, centre crop 224
  -- scaled with ``image_size`` (shorter side ``round(image_size * 256 / 224)``).

Test split: RobustBench evaluates ImageNet models on a fixed 5,000-image subset of the validation
set, listed in ``robustbench/helper_files/imagenet_test_image_ids.txt`` of the installed
``robustbench`` package (RobustBench's code is MIT-licensed, Copyright (c) 2020 Francesco Croce,
Maksym Andriushchenko, Vikash Sehwag; the list is read from the installed package, not copied).
When that file is present and every listed image is under ``ROOT/val``, the test split is those
5,000 images in the list's order; when none of them is there (a smaller validation folder), the
whole ``ROOT/val`` is the test split and ``DataInfo.source`` says so; a partial match is an error.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import DataInfo
from .errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["load_imagenet", "ImageFolderDataset", "ImageNetTrain", "ImageNetEval", "robustbench_subset_ids",
           "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_IMAGE_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SUBSET_FILE = "helper_files/imagenet_test_image_ids.txt"


def _pil():
    from .._optional import require

    return require("PIL.Image", "vision", "reading ImageNet's image files")


def _to_tensor(img) -> torch.Tensor:
    """torchvision's ``ToTensor`` of an RGB PIL image: float [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


class ImageNetEval:
    """``Resize(round(image_size * 256 / 224))`` + ``CenterCrop(image_size)`` + ``ToTensor``:
    RobustBench's ``Res256Crop224`` at ``image_size`` 224."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE):
        self.size = int(image_size)
        self.resize = int(round(self.size * 256 / 224))

    def __call__(self, img) -> torch.Tensor:
        Image = _pil()
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:   # torchvision: the shorter side to `resize`, the longer int(resize * long / short)
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if w <= h else (new_long, self.resize)
            img = img.resize(size, Image.BILINEAR)
        w, h = img.size
        th = tw = self.size
        if w < tw or h < th:   # torchvision pads with zeros before cropping
            canvas = Image.new("RGB", (max(w, tw), max(h, th)))
            canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
            img, (w, h) = canvas, canvas.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return _to_tensor(img.crop((left, top, left + tw, top + th)))

    def __repr__(self):
        return f"ImageNetEval(resize={self.resize}, center_crop={self.size})"


class ImageNetTrain:
    """``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` +
    ``RandomHorizontalFlip()`` + ``ToTensor``, drawing from torch's global RNG like torchvision."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(image_size), tuple(scale), tuple(ratio)

    def _params(self, width: int, height: int):
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,)).item())
                j = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return i, j, h, w
        in_ratio = width / height   # fallback: the central crop of the closest allowed ratio
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img) -> torch.Tensor:
        Image = _pil()
        i, j, h, w = self._params(*img.size)
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BILINEAR)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img)

    def __repr__(self):
        return f"ImageNetTrain(random_resized_crop={self.size}, scale={self.scale}, flip=0.5)"


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs read lazily from files: [3, H, W] floats in [0, 1].

    ``transform`` maps the decoded RGB PIL image to a tensor (:class:`ImageNetTrain` for
    training); without one, :class:`ImageNetEval` at ``image_size`` is used, so every item of a
    split has the same shape.
    """

    def __init__(self, paths, targets, classes, image_size: int = DEFAULT_IMAGE_SIZE,
                 transform: Optional[Callable] = None):
        self.paths = np.asarray([os.fsencode(str(p)) for p in paths], dtype=np.bytes_) if len(paths) else \
            np.zeros(0, dtype="S1")
        self.y = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.transform = transform
        self._eval = ImageNetEval(self.image_size)

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        path = os.fsdecode(self.paths[i])
        Image = _pil()
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as exc:
            raise CorruptDatasetError(Path(path), f"unreadable image ({exc})") from None
        x = (self.transform or self._eval)(img)
        return x, self.y[i]

    def with_transform(self, transform) -> "ImageFolderDataset":
        other = copy.copy(self)
        other.transform = transform
        return other


def robustbench_subset_ids() -> Optional[list]:
    """``<wnid>/<file>`` lines of the installed robustbench's 5,000-image list, or None."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SUBSET_FILE
        if f.is_file():
            return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    return None


def _images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def load_imagenet(root="./data", image_size: int = DEFAULT_IMAGE_SIZE, subset_ids: Optional[list] = None):
    """ImageNet as ``(train, test, info)`` from ``root/train/<wnid>/*`` and ``root/val/<wnid>/*``.

    ``subset_ids``: the ``<wnid>/<file>`` list of the test split (default: RobustBench's, see the
    module docstring).  Raises :class:`DatasetNotFoundError` / :class:`CorruptDatasetError`
    naming the folder or file at fault.
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    root = Path(root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DatasetNotFoundError("ImageNet", [train_dir, val_dir],
                                   "Give the ImageFolder root holding train/<wnid>/ and val/<wnid>/ as data.root "
                                   "(ILSVRC-2012 from image-net.org; the validation images sorted into wnid "
                                   "folders).")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise CorruptDatasetError(train_dir, "no class folders (expected train/<wnid>/<images>)")
    class_of = {c: i for i, c in enumerate(classes)}
    train_paths, train_labels = [], []
    for c in classes:
        imgs = _images(train_dir / c)
        if not imgs:
            raise CorruptDatasetError(train_dir / c, f"no images ({', '.join(EXTENSIONS)}) in this class folder")
        train_paths += imgs
        train_labels += [class_of[c]] * len(imgs)
    val_classes = sorted(d.name for d in val_dir.iterdir() if d.is_dir())
    unknown = [c for c in val_classes if c not in class_of]
    if unknown:
        raise CorruptDatasetError(val_dir / unknown[0], f"{len(unknown)} validation class folder(s) have no "
                                  "training folder (e.g. this one): the class indices would not match")
    ids = robustbench_subset_ids() if subset_ids is None else list(subset_ids)
    test_paths, test_labels, source = [], [], str(root)
    found = [i for i in ids if (val_dir / i).is_file()] if ids else []
    if ids and len(found) == len(ids):
        for i in ids:
            wnid = i.split("/", 1)[0]
            if wnid not in class_of:
                raise CorruptDatasetError(val_dir / i, f"class {wnid} has no training folder")
            test_paths.append(val_dir / i)
            test_labels.append(class_of[wnid])
        source += f" (test: RobustBench's {len(ids)}-image ImageNet subset)"
    elif found:
        missing = next(i for i in ids if not (val_dir / i).is_file())
        raise CorruptDatasetError(val_dir / missing, f"{len(ids) - len(found)} of the {len(ids)} images of "
                                  "RobustBench's evaluation subset are missing (e.g. this one); give the complete "
                                  "validation set")
    else:
        for c in val_classes:
            imgs = _images(val_dir / c)
            test_paths += imgs
            test_labels += [class_of[c]] * len(imgs)
        if not test_paths:
            raise CorruptDatasetError(val_dir, "no images (expected val/<wnid>/<images>)")
        source += " (test: the whole val folder; RobustBench's 5,000-image list is not in it)"
    info = DataInfo("imagenet", len(classes), 3, int(image_size), IMAGENET_MEAN, IMAGENET_STD, source)
    return (ImageFolderDataset(train_paths, train_labels, classes, image_size),
            ImageFolderDataset(test_paths, test_labels, classes, image_size), info)
