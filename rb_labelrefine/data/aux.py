"""Auxiliary generated training data (``data.aux``), memory-mapped and streamed.

The top CIFAR entries of RobustBench that use no extra *real* data train on 1M-50M images
sampled from a diffusion model and pseudo-labelled.  The public sets are ``.npz`` archives with
two arrays, ``image`` (uint8, N x H x W x C) and ``label`` (integers, N):

* Gowal et al. 2021 / Rebuffi et al. 2021 (DeepMind, github.com/deepmind/deepmind-research,
  ``adversarial_robustness``): 1M DDPM images per set,
  ``https://storage.googleapis.com/dm-adversarial-robustness/cifar10_ddpm.npz`` (also
  ``cifar100_ddpm.npz``, ``svhn_ddpm.npz``).  This is the file the ADR code's ``AuxDDPM`` reads
  (its gin configs: ``/path/to/cifar10_ddpm.npz``).
* Wang et al. 2023 (github.com/wzekai99/DM-Improves-AT): EDM images, HuggingFace data set
  ``P2333/DM-Improves-AT``, ``cifar10/1m.npz`` ... ``cifar10/50m.npz`` and ``cifar100/1m.npz`` ...
  (stored uncompressed, ~3.08 GB per million 32x32x3 images).

A 1M x 32 x 32 x 3 file is 3 GB, so it is never loaded: the ``image`` member of an
*uncompressed* ``.npz`` is an ``.npy`` file stored verbatim inside the zip, and it is opened
with :class:`numpy.memmap` at its byte offset (the zip's local file header and the ``.npy``
header are parsed here).  Labels (8 MB for 1M) are read into memory and checked once.  A
*compressed* archive (``np.savez_compressed``) cannot be mapped: :func:`open_aux` refers to
:func:`convert_npz` (``python -m rb_labelrefine.data.aux SRC DST``), a one-time streaming
rewrite into an uncompressed archive that never holds the array in memory.  It is not done
automatically next to the file: that would silently write gigabytes into what may be a
read-only or shared data directory.

Batches (:class:`AuxStream`): each training batch of ``b`` real images gets
``aux_count(b, fraction)`` auxiliary images stacked under it, so auxiliary images are
``fraction`` of the batch and ``data.batch_size`` stays the *real* batch (an epoch is still one
pass over the real data, as in the ADR code and in the Carmon/Gowal/Wang samplers).  The ADR
code (``advTrainer.py``) draws ``--aux_batch_size`` images from ``cycle(aux_loader)`` and
``vstack``s them under ``--batch_size`` real ones -- the auxiliary batch *adds* to the real
batch; its paper (App. F) trains with batch 1024, 75 % synthetic, i.e. ``--batch_size 256
--aux_batch_size 768`` = ``data.batch_size=256, data.aux_fraction=0.75`` here.  Wang et al. use
batch 512-1024 with ``unsup_fraction`` 0.7 of the *total* batch: ``data.batch_size = round(0.3 *
total)``.  Differences from the ADR code: ``itertools.cycle`` replays the first pass's batches
(same order and same augmentation) forever, here every pass is a fresh permutation and
augmentation is drawn per use; the ADR code also sets BatchNorm momentum to 1.0 for the first
step and 0.01 afterwards when it uses extra data (not done here).

The stream samples without replacement: pass ``p`` is a permutation that depends only on
``(seed, p)`` (never on the real data's order), and its position ``(pass, offset)`` is part of
the checkpoint, so a resumed run draws exactly the images an uninterrupted one would.
"""
from __future__ import annotations

import mmap
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["AuxData", "AuxStream", "open_aux", "aux_count", "convert_npz", "npz_member_memmap"]

IMAGE_KEY, LABEL_KEY = "image", "label"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # zip local file header (APPNOTE 4.3.7), 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"
_READ_CHUNK = 32      # images read between two unmaps (bounds the resident set of one read)
_STREAM_TAG = 0xA0C5  # separates the auxiliary stream's seeds from every other use of train.seed


def aux_count(n_real: int, fraction: float) -> int:
    """Auxiliary images stacked under ``n_real`` real ones so they are ``fraction`` of the batch."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"aux_fraction must be in [0, 1), got {fraction}")
    return int(round(n_real * fraction / (1.0 - fraction)))


def _member_name(zf: zipfile.ZipFile, key: str) -> Optional[str]:
    for name in (f"{key}.npy", key):
        if name in zf.namelist():
            return name
    return None


def npz_member_memmap(path: Union[str, Path], key: str) -> np.memmap:
    """``np.load(path)[key]`` as a read-only memory map (uncompressed ``.npz`` only)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        name = _member_name(zf, key)
        if name is None:
            found = sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())
            raise CorruptDatasetError(path, f"no array {key!r} (found {found})")
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CorruptDatasetError(
            path, f"array {key!r} is compressed (np.savez_compressed), so it cannot be memory-mapped; convert "
            f"the file once, without loading it: python -m rb_labelrefine.data.aux {path} "
            f"{path.with_name(path.stem + '_stored.npz')}")
    with open(path, "rb") as f:
        # The data start after the *local* header, whose extra field (zip64 sizes) may differ
        # in length from the central directory's copy that zipfile exposes.
        f.seek(info.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
            raise CorruptDatasetError(path, f"bad zip local header for {name!r}")
        fields = _LOCAL_HEADER.unpack(raw)
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except ValueError as exc:
            raise CorruptDatasetError(path, f"array {key!r} is not a valid .npy member ({exc})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise CorruptDatasetError(path, f"array {key!r} holds Python objects; expected numbers")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > path.stat().st_size:
        raise CorruptDatasetError(path, f"array {key!r} is truncated ({nbytes} bytes expected)")
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")
    raw_map = getattr(mm, "_mmap", None)
    if raw_map is not None and hasattr(mmap, "MADV_RANDOM"):
        # batches read scattered 3 KB images: the kernel's default read-ahead would pull ~128 KB
        # around each one (wasted I/O and page cache)
        raw_map.madvise(mmap.MADV_RANDOM)
    return mm


class AuxData:
    """The arrays of an auxiliary ``.npz``: images memory-mapped, labels in memory.

    ``image`` must be uint8 N x H x W x C (N x H x W is read as one channel); ``label`` N
    integers in ``[0, num_classes)``.  ``batch(indices)`` returns float [B, C, H, W] in [0, 1]
    (``transform``, e.g. the training augmentation, applied per image) and int64 labels.
    """

    def __init__(self, path: Union[str, Path], *, num_classes: Optional[int] = None,
                 image_shape: Optional[tuple] = None, transform: Optional[Callable] = None):
        path = Path(path)
        if not path.is_file():
            raise DatasetNotFoundError("auxiliary data (data.aux)", [path],
                                       "Download a generated set, e.g. https://storage.googleapis.com/"
                                       "dm-adversarial-robustness/cifar10_ddpm.npz (see rb_labelrefine/data/aux.py).")
        if not zipfile.is_zipfile(path):
            raise CorruptDatasetError(path, "not an .npz archive (expected arrays 'image' and 'label', as written "
                                      "by np.savez)")
        self.path = path
        img = npz_member_memmap(path, IMAGE_KEY)
        if img.ndim == 3:
            img = img[..., None]
        if img.ndim != 4 or img.dtype != np.uint8:
            raise CorruptDatasetError(path, f"array 'image' must be uint8 N x H x W x C, got {img.dtype} of shape "
                                      f"{img.shape}")
        if img.shape[-1] not in (1, 3):
            raise CorruptDatasetError(path, f"array 'image' must be channels-last (N x H x W x C, C = 1 or 3), got "
                                      f"shape {img.shape}")
        self.images = img
        self._map = getattr(img, "_mmap", None)   # the mmap.mmap under the array (numpy keeps it on views)
        with zipfile.ZipFile(path) as zf:
            name = _member_name(zf, LABEL_KEY)
            if name is None:
                raise CorruptDatasetError(path, f"no array 'label' (found {zf.namelist()})")
            with zf.open(name) as f:
                try:
                    labels = np.lib.format.read_array(f, allow_pickle=False)
                except ValueError as exc:
                    raise CorruptDatasetError(path, f"array 'label' is not a plain number array ({exc})") from None
        if labels.ndim != 1 or len(labels) != len(img):
            raise CorruptDatasetError(path, f"array 'label' must have shape ({len(img)},) to match 'image', got "
                                      f"{labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise CorruptDatasetError(path, f"array 'label' must hold integer class indices, got {labels.dtype}")
        if num_classes is not None and len(labels):
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if len(bad):
                raise CorruptDatasetError(path, f"array 'label' has {len(bad)} values outside [0, {num_classes}) "
                                          f"(first at index {bad[0]}: {labels[bad[0]]})")
        if image_shape is not None and tuple(img.shape[1:]) != tuple(image_shape):
            raise CorruptDatasetError(path, f"array 'image' holds {tuple(img.shape[1:])} images (H x W x C), the "
                                      f"training data {tuple(image_shape)}")
        if len(labels) == 0:
            raise CorruptDatasetError(path, "the archive holds no images")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.argsort(indices, kind="stable")   # read the map front to back, then restore the order
        sel = indices[order]
        raw = np.empty((len(indices),) + self.images.shape[1:], dtype=np.uint8)
        for s in range(0, len(sel), _READ_CHUNK):
            raw[order[s:s + _READ_CHUNK]] = self.images[sel[s:s + _READ_CHUNK]]
            if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
                # Unmap the pages just read from this process (they stay in the kernel's page
                # cache): otherwise the resident set grows towards the file size as a run touches
                # every image.  In chunks, because a fault may map a whole large folio of the page
                # cache (measured ~1 MB per 3 KB image on Linux 6.18): 768 images at once = 0.7 GB.
                self._map.madvise(mmap.MADV_DONTNEED)
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div_(255)
        if self.transform is not None:
            x = torch.stack([self.transform(xi) for xi in x])
        return x, self.labels[torch.from_numpy(indices)]


class AuxStream:
    """An endless stream of auxiliary samples without replacement, resumable exactly.

    Pass ``p`` visits every index once in the order ``permutation(seed, p)``; ``draw(k)``
    continues where the last draw stopped (across passes).  ``state_dict()`` is the position.
    """

    def __init__(self, data: AuxData, seed: int):
        self.data, self.seed = data, int(seed)
        self.n = len(data)
        self.pass_, self.offset = 0, 0
        self._perm_pass, self._perm = None, None

    def permutation(self, p: int) -> np.ndarray:
        if self._perm_pass != p:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_STREAM_TAG, self.seed, p])))
            self._perm, self._perm_pass = rng.permutation(self.n), p
        return self._perm

    def next_indices(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            take = min(k, self.n - self.offset)
            out.append(self.permutation(self.pass_)[self.offset:self.offset + take])
            self.offset += take
            k -= take
            if self.offset == self.n:
                self.pass_, self.offset = self.pass_ + 1, 0
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def draw(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k`` samples: images [k, C, H, W], labels [k], indices into the archive [k]."""
        idx = self.next_indices(k)
        x, y = self.data.batch(idx)
        return x, y, torch.from_numpy(idx.astype(np.int64))

    def state_dict(self) -> dict:
        return {"pass": self.pass_, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"the checkpoint's auxiliary stream ran over {state['n']} images, "
                             f"{self.data.path} holds {self.n} (a different file?)")
        self.pass_, self.offset = int(state["pass"]), int(state["offset"])


def open_aux(path, seed: int, *, num_classes: int, image_shape: tuple, transform=None) -> AuxStream:
    """The stream the trainer uses: ``image_shape`` = (H, W, C) of the real training images."""
    return AuxStream(AuxData(path, num_classes=num_classes, image_shape=image_shape, transform=transform), seed)


def convert_npz(src: Union[str, Path], dst: Union[str, Path], chunk_bytes: int = 64 << 20) -> Path:
    """Rewrite a (compressed) ``.npz`` as an uncompressed one that :class:`AuxData` can map.

    Streams each member through ``chunk_bytes`` of memory (never the whole array); writes
    ``dst`` under a temporary name and renames it when complete.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert_npz: the destination must differ from the source")
    tmp = dst.with_name(dst.name + ".partial")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                      allowZip64=True) as zout:
        for name in zin.namelist():
            with zin.open(name) as fin, zout.open(name, "w", force_zip64=True) as fout:
                while True:
                    block = fin.read(chunk_bytes)
                    if not block:
                        break
                    fout.write(block)
    tmp.replace(dst)
    return dst


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rb_labelrefine.data.aux",
                                 description="Rewrite a compressed .npz of generated data as an uncompressed, "
                                             "memory-mappable one (streamed; needs the output's size on disk).")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    out = convert_npz(args.src, args.dst)
    data = AuxData(out)
    print(f"{out}: {len(data)} images of {tuple(data.images.shape[1:])}, memory-mappable")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
