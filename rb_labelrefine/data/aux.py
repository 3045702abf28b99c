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
batch 512-1024 with ``unsup_fraction`` 0.7 of the *total* batch: ``data.aux_batch=split`` (then
``data.batch_size`` is the total batch and ``aux_fraction`` of it is generated; the
``*-wang2023`` presets).  Differences from the ADR code: ``itertools.cycle`` replays the first
pass's batches (same order and same augmentation) forever, here every pass is a fresh permutation
and augmentation is drawn per use; the ADR code also sets BatchNorm momentum to 1.0 for the first
step and 0.01 afterwards when it uses extra data (``train.bn_first_step_momentum``).

The stream samples without replacement: pass ``p`` is a permutation that depends only on
``(seed, p)`` (never on the real data's order), and its position ``(pass, offset)`` is part of
the checkpoint, so a resumed run draws exactly the images an uninterrupted one would.  The
training batch stream (``rb_labelrefine/training/stream.py``) composes the batches: under
torchrun every rank advances this stream by the global batch's count (so every rank's position is
the checkpoint's) and reads only its own slice (:meth:`AuxData.read`) -- disjoint shares; with
``data.device_resident`` the raw rows are augmented as whole batches on the device.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..errors import ConfigError
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
        raise ConfigError("data.aux_fraction", f"must be in [0, 1), got {fraction}")
    return int(round(n_real * fraction / (1.0 - fraction)))


_NPY_MAGIC = b"\x93NUMPY"
_NPY_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_NPY_HEADER_MAX = 1 << 16
_FINGERPRINT_TAIL = 1 << 12     # the zip's central directory is at the end: its last bytes join the fingerprint


class _Member:
    """One validated ``.npy`` member of an archive: its array lies in [data_offset, data_end)."""

    def __init__(self, key, name, header_offset, data_offset, data_end, shape, dtype, fortran):
        self.key, self.name, self.header_offset = key, name, header_offset
        self.data_offset, self.data_end = data_offset, data_end
        self.shape, self.dtype, self.fortran = shape, dtype, fortran


def _member_name(zf: zipfile.ZipFile, key: str, path=None) -> Optional[str]:
    """The archive's one member for ``key`` (``key.npy`` or ``key``); both present is refused:
    a reader taking one and ``np.load`` the other would see different data."""
    names = [n for n in (f"{key}.npy", key) if n in zf.NameToInfo]
    if len(names) > 1:
        raise CorruptDatasetError(path, f"holds both {names[0]!r} and {names[1]!r}: which one is array {key!r}?")
    if len([i for i in zf.infolist() if i.filename in names]) > 1:
        raise CorruptDatasetError(path, f"holds member {names[0]!r} more than once")
    return names[0] if names else None


def _parse_npy_header(f, start: int, end: int, path, key: str):
    """``(shape, dtype, fortran, data_offset)`` of the .npy stored in [start, end) of ``f``; every
    field is checked against the member's bounds (never numpy's header reader: a lying header
    length or a negative dimension would reach its parser)."""
    def bad(why):
        return CorruptDatasetError(path, f"array {key!r} is not a valid .npy member: {why}")

    f.seek(start)
    head = f.read(8)
    if len(head) < 8 or end - start < 8 or head[:6] != _NPY_MAGIC:
        raise bad("no .npy magic at the start of its member")
    version = (head[6], head[7])
    if version not in _NPY_VERSIONS:
        raise bad(f"format version {version[0]}.{version[1]} (known: 1.0, 2.0, 3.0)")
    fmt, encoding = _NPY_VERSIONS[version]
    lsize = struct.calcsize(fmt)
    raw_len = f.read(lsize)
    if len(raw_len) != lsize:
        raise bad("truncated header")
    (hlen,) = struct.unpack(fmt, raw_len)
    data_offset = start + 8 + lsize + hlen
    if hlen > _NPY_HEADER_MAX or data_offset > end:
        raise bad(f"its header claims {hlen:,} bytes, beyond the member ({end - start:,} bytes)")
    try:
        text = f.read(hlen).decode(encoding)
        import ast

        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError) as exc:
        raise bad(f"unreadable header ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise bad("its header must be a dict of 'descr', 'fortran_order' and 'shape'")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(
            type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {str(shape)[:60]} (non-negative integers expected)")
    if not isinstance(fortran, bool):
        raise bad(f"fortran_order {str(fortran)[:20]} (a bool expected)")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception as exc:  # noqa: BLE001 - any failure of a crafted descr is a bad file
        raise bad(f"dtype {str(header['descr'])[:60]} ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise CorruptDatasetError(path, f"array {key!r} is not a plain number array: it holds Python objects")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
    if data_offset + nbytes != end:
        raise bad(f"its header claims shape {shape} of {dtype} ({nbytes:,} bytes), its member holds "
                  f"{end - data_offset:,} bytes of data")
    return shape, dtype, fortran, data_offset


def _members(path: Path, f, size: int, keys=(IMAGE_KEY, LABEL_KEY)) -> dict:
    """The validated members ``keys`` of the archive open as ``f`` (``size`` bytes): each stored
    uncompressed and unencrypted, its local header consistent, its data inside its own member and
    the archive, and its .npy header matching the member's size."""
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise CorruptDatasetError(path, f"not a readable .npz archive ({exc})") from None
    out = {}
    with zf:
        end_of_data = getattr(zf, "start_dir", size)
        for key in keys:
            name = _member_name(zf, key, path)
            if name is None:
                found = sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())[:20]
                raise CorruptDatasetError(path, f"no array {key!r} (found {found})")
            info = zf.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:
                hint = (f"; convert the file once, without loading it: python -m rb_labelrefine.data.aux {path} "
                        f"{path.with_name(path.stem + '_stored.npz')}")
                raise CorruptDatasetError(path, f"array {key!r} is compressed (np.savez_compressed), so it cannot be "
                                          f"memory-mapped or bounded before reading{hint}")
            if info.flag_bits & 0x1:
                raise CorruptDatasetError(path, f"array {key!r} is encrypted")
            if info.compress_size != info.file_size:
                raise CorruptDatasetError(path, f"array {key!r}: stored member of {info.file_size:,} bytes claims "
                                          f"{info.compress_size:,} in the archive")
            f.seek(info.header_offset)
            raw = f.read(_LOCAL_HEADER.size)
            if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
                raise CorruptDatasetError(path, f"bad zip local header for {name!r}")
            fields = _LOCAL_HEADER.unpack(raw)
            start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            end = start + info.file_size
            if end > min(size, end_of_data):
                raise CorruptDatasetError(path, f"array {key!r} is truncated: its member ends at byte {end:,}, the "
                                          f"archive's data at {min(size, end_of_data):,}")
            shape, dtype, fortran, offset = _parse_npy_header(f, start, end, path, key)
            out[key] = _Member(key, name, info.header_offset, offset, end, shape, dtype, fortran)
        spans = sorted((m.header_offset, m.data_end, m.key) for m in out.values())
        for (_, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise CorruptDatasetError(path, f"arrays {k0!r} and {k1!r} overlap in the archive")
    return out


def _open_archive(path: Path):
    """The archive as a file object: a regular file (never a FIFO or a device), opened without
    blocking."""
    from ..safe_files import UnsafeFileError, open_binary

    try:
        return open_binary(path, max_bytes=1 << 50)
    except UnsafeFileError as exc:
        raise CorruptDatasetError(path, exc.problem) from None


def _memmap(path: Path, m: _Member) -> np.memmap:
    mm = np.memmap(path, dtype=m.dtype, mode="r", offset=m.data_offset, shape=m.shape,
                   order="F" if m.fortran else "C")
    raw_map = getattr(mm, "_mmap", None)
    if raw_map is not None and hasattr(mmap, "MADV_RANDOM"):
        # batches read scattered 3 KB images: the kernel's default read-ahead would pull ~128 KB
        # around each one (wasted I/O and page cache)
        raw_map.madvise(mmap.MADV_RANDOM)
    return mm


def npz_member_memmap(path: Union[str, Path], key: str) -> np.memmap:
    """``np.load(path)[key]`` as a read-only memory map (uncompressed ``.npz`` only), after the
    member is validated (:func:`_members`)."""
    path = Path(path)
    with _open_archive(path) as f:
        m = _members(path, f, os.fstat(f.fileno()).st_size, keys=(key,))[key]
    return _memmap(path, m)


class AuxData:
    """The arrays of an auxiliary ``.npz``: images memory-mapped, labels in memory.

    ``image`` must be uint8 N x H x W x C (N x H x W is read as one channel); ``label`` N
    integers in ``[0, num_classes)``.  ``batch(indices)`` returns float [B, C, H, W] in [0, 1]
    (``transform``, e.g. the training augmentation, applied per image) and int64 labels.
    """

    def __init__(self, path: Union[str, Path], *, num_classes: Optional[int] = None,
                 image_shape: Optional[tuple] = None, transform: Optional[Callable] = None):
        path = Path(path)
        if not path.exists():
            raise DatasetNotFoundError("auxiliary data (data.aux)", [path],
                                       "Download a generated set, e.g. https://storage.googleapis.com/"
                                       "dm-adversarial-robustness/cifar10_ddpm.npz (see rb_labelrefine/data/aux.py).")
        self.path = path
        # Every member is validated before anything is mapped or read (issue 24): stored, inside
        # its own member and the archive, its header consistent with its size.
        self._file = _open_archive(path)
        st = os.fstat(self._file.fileno())
        if not zipfile.is_zipfile(self._file):
            raise CorruptDatasetError(path, "not an .npz archive (expected arrays 'image' and 'label', as written "
                                      "by np.savez)")
        members = _members(path, self._file, st.st_size)
        im, lm = members[IMAGE_KEY], members[LABEL_KEY]
        if len(im.shape) not in (3, 4) or im.dtype != np.uint8:
            raise CorruptDatasetError(path, f"array 'image' must be uint8 N x H x W x C, got {im.dtype} of shape "
                                      f"{im.shape}")
        if len(im.shape) == 4 and im.shape[-1] not in (1, 3):
            raise CorruptDatasetError(path, f"array 'image' must be channels-last (N x H x W x C, C = 1 or 3), got "
                                      f"shape {im.shape}")
        if len(lm.shape) != 1 or lm.shape[0] != im.shape[0]:
            raise CorruptDatasetError(path, f"array 'label' must have shape ({im.shape[0]},) to match 'image', got "
                                      f"{lm.shape}")
        if lm.dtype.kind not in "iu":   # timedelta64 is an np.integer subtype; bool is not a class index
            raise CorruptDatasetError(path, f"array 'label' must hold integer class indices, got {lm.dtype}")
        if image_shape is not None and tuple(im.shape[1:]) + ((1,) if len(im.shape) == 3 else ()) != tuple(image_shape):
            got = tuple(im.shape[1:]) + ((1,) if len(im.shape) == 3 else ())
            raise CorruptDatasetError(path, f"array 'image' holds {got} images (H x W x C), the "
                                      f"training data {tuple(image_shape)}")
        if im.shape[0] == 0:
            raise CorruptDatasetError(path, "the archive holds no images")
        labels = np.array(_memmap(path, lm))   # N integers, bounded by the member's real size
        if num_classes is not None:
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if len(bad):
                raise CorruptDatasetError(path, f"array 'label' has {len(bad)} values outside [0, {num_classes}) "
                                          f"(first at index {bad[0]}: {labels[bad[0]]})")
        img = _memmap(path, im)
        if img.ndim == 3:
            img = img[..., None]
        self.images = img
        self._map = getattr(img, "_mmap", None)   # the mmap.mmap under the array (numpy keeps it on views)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self._fingerprint = self._take_fingerprint(members)
        self._members = members

    def _take_fingerprint(self, members) -> tuple:
        """(size, mtime, inode, device, digest of every member's headers and the archive's tail)."""
        import hashlib

        f = self._file
        st = os.fstat(f.fileno())
        h = hashlib.blake2b(digest_size=16)
        for m in sorted(members.values(), key=lambda m: m.header_offset):
            f.seek(m.header_offset)
            h.update(f.read(min(m.data_offset - m.header_offset, _NPY_HEADER_MAX + 256)))
        f.seek(max(0, st.st_size - _FINGERPRINT_TAIL))
        h.update(f.read(_FINGERPRINT_TAIL))
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, h.hexdigest()

    def check(self, full: bool = True) -> None:
        """Refuse (:class:`CorruptDatasetError`, exit 2, naming the file) an archive that changed
        since it was opened: truncated, rewritten or replaced.  Reading a truncated memory map kills
        the process with SIGBUS, so this runs before reads.  ``full=False`` is one ``fstat`` of the
        open file (size and modification time, ~1 us: before every batch); ``full=True`` also
        compares the path's inode and a digest of the members' headers and the archive's tail
        (a few KB read: at every checkpoint)."""
        size, mtime, ino, dev, digest = self._fingerprint
        try:
            st = os.fstat(self._file.fileno())
            now = (st.st_size, st.st_mtime_ns)
            if full:
                pst = os.stat(self.path)
                replaced = (pst.st_ino, pst.st_dev) != (ino, dev)
        except (OSError, ValueError) as exc:
            raise CorruptDatasetError(self.path, f"cannot be checked any more ({exc}); it was removed or replaced "
                                      "during training") from None
        what = None
        if now[0] != size:
            what = f"its size changed from {size:,} to {now[0]:,} bytes"
        elif now[1] != mtime:
            what = "it was modified"
        elif full and replaced:
            what = "another file replaced it"
        elif full and self._take_fingerprint(self._members)[4] != digest:
            what = "its contents changed"
        if what is not None:
            raise CorruptDatasetError(self.path, f"changed while training read it ({what}); the run stopped before "
                                      "reading it again (a truncated memory map would kill the process). Restore the "
                                      "file, then --resume from the last checkpoint")

    def close(self) -> None:
        """Release the open archive (the memory map stays valid while referenced)."""
        f = self.__dict__.get("_file")
        if f is not None:
            f.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_file", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file = _open_archive(self.path)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The raw images ``indices`` (uint8 N x H x W x C, in the order given), read through the
        map without keeping its pages mapped (see below).  The batch stream
        (``rb_labelrefine/training/stream.py``) augments them as whole batches."""
        indices = np.asarray(indices, dtype=np.int64)
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
        return raw

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images [B, C, H, W] in [0, 1] (``transform`` applied per image, drawing from
        torch's global RNG: the per-item path) and int64 labels."""
        raw = self.read(indices)
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
        """The position (the checkpoint's "aux" entry); first the archive's full check, so that a
        checkpoint is never written over a file that changed under the run."""
        self.data.check()
        return {"pass": self.pass_, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; a position outside the archive (``offset`` not in ``[0, n)``, a
        negative ``pass``) or not an integer is a ValueError naming the entry (the trainer's restore
        makes it a ResumeError naming the checkpoint, and also bounds ``pass`` by the steps done)."""
        n, pass_, offset = (_position(state, k) for k in ("n", "pass", "offset"))
        if n != self.n:
            raise ValueError(f"the checkpoint's auxiliary stream ran over {n} images, "
                             f"{self.data.path} holds {self.n} (a different file?)")
        if not 0 <= offset < self.n:
            raise ValueError(f"'aux.offset' is {offset}, outside [0, {self.n}) (the images of {self.data.path})")
        if pass_ < 0:
            raise ValueError(f"'aux.pass' is {pass_}, not a pass number (>= 0)")
        self.pass_, self.offset = pass_, offset


def _position(state: dict, key: str) -> int:
    v = state[key]
    if hasattr(v, "numel") and v.numel() == 1 and not v.is_floating_point():   # a 0-d integer tensor
        v = int(v)
    if isinstance(v, np.integer):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"'aux.{key}' is {v!r}, not an integer")
    return v


def open_aux(path, seed: int, *, num_classes: int, image_shape: tuple, transform=None) -> AuxStream:
    """The stream the trainer uses: ``image_shape`` = (H, W, C) of the real training images."""
    return AuxStream(AuxData(path, num_classes=num_classes, image_shape=image_shape, transform=transform), seed)


def convert_npz(src: Union[str, Path], dst: Union[str, Path], chunk_bytes: int = 64 << 20) -> Path:
    """Rewrite a (compressed) ``.npz`` as an uncompressed one that :class:`AuxData` can map.

    Streams the ``image`` and ``label`` members through ``chunk_bytes`` of memory (never the whole
    array; other members are left out); writes ``dst`` under a new temporary name created
    exclusively (``.DST.<hex>.partial``: never through an existing file or link), validates it as
    :class:`AuxData` does, and renames it onto ``dst`` when complete.  Bad input raises
    :class:`CorruptDatasetError` naming the file; nothing is left behind.
    """
    from ..errors import BadInputError
    from ..safe_files import create_exclusive

    src, dst = Path(src), Path(dst)
    try:
        same = src.resolve() == dst.resolve()
    except (OSError, RuntimeError) as exc:
        raise BadInputError(f"{dst}: cannot be resolved ({exc})") from None
    if same:
        raise BadInputError(f"{dst}: the destination must differ from the source")
    if dst.is_dir():
        raise BadInputError(f"{dst} is a directory; name the output file")
    fin_file = _open_archive(src)
    fd = tmp = None
    for _ in range(100):
        tmp = dst.with_name(f".{dst.name}.{os.urandom(4).hex()}.partial")
        try:
            fd = create_exclusive(tmp)
            break
        except FileExistsError:
            continue
    if fd is None:
        raise FileExistsError(f"could not create a temporary file next to {dst}")
    try:
        with fin_file, os.fdopen(fd, "wb") as raw_out:
            try:
                zin = zipfile.ZipFile(fin_file)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise CorruptDatasetError(src, f"not a readable .npz archive ({exc})") from None
            with zin, zipfile.ZipFile(raw_out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zout:
                for key in (IMAGE_KEY, LABEL_KEY):
                    name = _member_name(zin, key, src)
                    if name is None:
                        raise CorruptDatasetError(src, f"no array {key!r} (found {sorted(zin.namelist())[:20]})")
                    try:
                        with zin.open(name) as fin, zout.open(name, "w", force_zip64=True) as fout:
                            while True:
                                block = fin.read(chunk_bytes)
                                if not block:
                                    break
                                fout.write(block)
                    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
                        # zlib.error is neither: catch it by module below
                        raise CorruptDatasetError(src, f"member {name!r} cannot be decompressed ({exc})") from None
                    except Exception as exc:  # noqa: BLE001 - zlib.error / bz2 / lzma errors of a corrupt member
                        if type(exc).__module__ in ("zlib", "_bz2", "_lzma", "bz2", "lzma"):
                            raise CorruptDatasetError(src, f"member {name!r} cannot be decompressed ({exc})") from None
                        raise
            raw_out.flush()
            os.fsync(raw_out.fileno())
        AuxData(tmp).close()     # the result must be a valid archive before it gets dst's name
        os.replace(tmp, dst)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, CorruptDatasetError) and Path(exc.path) == tmp:
            raise CorruptDatasetError(src, f"does not convert into a valid archive: {exc.problem}") from None
        raise
    return dst


def _main(argv=None) -> int:
    import argparse
    import sys

    from ..errors import exit_code_of

    ap = argparse.ArgumentParser(prog="python -m rb_labelrefine.data.aux",
                                 description="Rewrite a compressed .npz of generated data as an uncompressed, "
                                             "memory-mappable one (streamed; needs the output's size on disk).")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    try:
        out = convert_npz(args.src, args.dst)
        data = AuxData(out)
        print(f"{out}: {len(data)} images of {tuple(data.images.shape[1:])}, memory-mappable")
        data.close()
    except Exception as exc:  # noqa: BLE001 - a message and an exit code, never a traceback for bad input
        code = exit_code_of(exc)
        if code is None:
            if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                code = 2
            elif isinstance(exc, OSError):
                code = 4
            else:
                raise
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
