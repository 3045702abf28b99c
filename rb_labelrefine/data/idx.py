"""Reader for the IDX format of MNIST / Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

Layout: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
dimension, then the values in C order. Every check raises :class:`CorruptDatasetError` naming
the file, so a truncated download is reported as such rather than as a reshape error later.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import CorruptDatasetError

__all__ = ["read_idx", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

# Magic numbers of the two MNIST file kinds: type 0x08 (ubyte), 3 resp. 1 dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


MAX_IDX_BYTES = 1 << 30   # an IDX file, decompressed (Fashion-MNIST's largest: 47 MB)


def _read_bytes(path: Path) -> bytes:
    """The file's (decompressed) bytes: a regular file (never a FIFO or device), at most
    :data:`MAX_IDX_BYTES` on disk and decompressed (a small gzip cannot expand without bound)."""
    from ..safe_files import UnsafeFileError, open_binary

    try:
        raw = open_binary(path, max_bytes=MAX_IDX_BYTES)
    except UnsafeFileError as e:
        raise CorruptDatasetError(path, e.problem) from None
    try:
        with raw:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                    data = f.read(MAX_IDX_BYTES + 1)
            else:
                data = raw.read(MAX_IDX_BYTES + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorruptDatasetError(path, f"not a complete gzip file ({e}); re-download it") from e
    if len(data) > MAX_IDX_BYTES:
        raise CorruptDatasetError(path, f"holds more than {MAX_IDX_BYTES:,} bytes (decompressed); an IDX data set "
                                  "is far smaller")
    return data


def read_idx(path, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    Args:
        path: the file.
        expected_magic: if given, the 4-byte magic number the file must start with
            (``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``), so images and labels cannot be swapped.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise CorruptDatasetError(path, f"file is {len(buf)} bytes, too short for an IDX header")
    magic = struct.unpack(">I", buf[:4])[0]
    zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise CorruptDatasetError(path, f"bad IDX magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise CorruptDatasetError(
            path, f"magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                  f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'} file)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise CorruptDatasetError(path, f"truncated header: {ndim} dimensions need {header} bytes, file has {len(buf)}")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = _DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize   # Python ints: 255 dimensions of 2^32 cannot overflow
    if len(buf) - header != expected:
        raise CorruptDatasetError(
            path, f"header says shape {tuple(dims)} ({expected} data bytes) but the file has "
                  f"{len(buf) - header} data bytes (truncated or corrupt)")
    # Copy so the array owns writable, native-endian memory (torch.from_numpy needs both).
    return np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
