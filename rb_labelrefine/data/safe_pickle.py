"""A pickle loader that can read the CIFAR batches (protocols 2-5) and nothing more dangerous.

The CIFAR python batches are pickled dicts of bytes, lists and numpy arrays. Unpickling them
with plain ``pickle.load`` would execute whatever a tampered file asks for (``__reduce__`` can
name any callable, e.g. ``os.system``), so :class:`RestrictedUnpickler` resolves only the few
globals numpy needs to rebuild an array and refuses everything else before it is ever called.
Even those are called only with sizes a data file can hold: an array constructor asked for more
than :data:`MAX_ARRAY_BYTES` (a crafted file asking for terabytes) is refused before anything is
allocated.
"""
from __future__ import annotations

import importlib
import math
import pickle
from pathlib import Path

import numpy as np

from .errors import CorruptDatasetError, UnsafePickleError

__all__ = ["RestrictedUnpickler", "safe_load_pickle", "MAX_ARRAY_BYTES"]

# The largest array a data pickle may build (CIFAR-100's training batch: 50000 x 3072 bytes = 147 MiB).
MAX_ARRAY_BYTES = 1 << 30

# (module, name) -> (module to import, attribute). ``numpy.core`` became ``numpy._core`` in numpy 2;
# files written by either numpy name either, so both spellings map to whichever exists.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # Protocol 2 has no bytes opcode: Python 3 writes every bytes object (dict keys, the array's
    # raw data) as _codecs.encode(<latin-1 text>, 'latin1').  Only that exact use is allowed.
    ("_codecs", "encode"): ("_latin1", "encode"),
}
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it (str -> bytes via latin-1), nothing else."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1 \
            or errors != "strict":
        raise _Refused(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}): a data pickle only "
                       "encodes text to bytes as latin-1")
    return obj.encode("latin-1")


class _TooLarge(ValueError):
    pass


def _check_size(shape, dtype) -> None:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise _TooLarge(f"an array of shape {dims!r} (dimensions must be non-negative integers)")
    try:
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        itemsize = 8
    n = math.prod(dims) * max(itemsize, 1)
    if n > MAX_ARRAY_BYTES:
        raise _TooLarge(f"an array of shape {dims} ({n:,} bytes) is larger than any data file holds "
                        f"(limit {MAX_ARRAY_BYTES:,} bytes); refused before allocating it")


class _BoundedArray(np.ndarray):
    """What the file's ``numpy.ndarray`` resolves to: calling it checks the size first and returns a
    plain ndarray; as ``_reconstruct``'s subtype its instances are turned back into plain arrays
    after loading (:func:`_plain`)."""

    def __new__(cls, shape, dtype=float, *args, **kwargs):
        _check_size(shape, dtype)
        return np.ndarray(shape, dtype, *args, **kwargs)


def _bounded_reconstruct(real):
    def reconstruct(subtype, shape, dtype):
        _check_size(shape, dtype)
        return real(subtype, shape, dtype)
    return reconstruct


def _plain(obj):
    if isinstance(obj, _BoundedArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def _resolve(module: str, name: str):
    if module == "_latin1":
        return _latin1_encode
    if module == "multiarray":
        try:  # numpy >= 2: import the new location directly, avoiding numpy.core's deprecation shim
            mod = importlib.import_module("numpy._core.multiarray")
        except ImportError:
            mod = importlib.import_module("numpy.core.multiarray")
    else:
        mod = importlib.import_module(module)
    return getattr(mod, name)


class _Refused(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` allows only numpy array reconstruction."""

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise _Refused(
                f"refusing to load global '{module}.{name}': only numpy arrays are allowed in a "
                "data file (a genuine CIFAR batch holds nothing else)")
        if target == ("numpy", "ndarray"):
            return _BoundedArray
        if target[1] == "_reconstruct":
            return _bounded_reconstruct(_resolve(*target))
        return _resolve(*target)


def safe_load_pickle(path, encoding: str = "bytes"):
    """Load a data pickle through :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: the file references a callable other than numpy's array rebuilders.
        CorruptDatasetError: the file is truncated or not a pickle at all.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _plain(RestrictedUnpickler(f, encoding=encoding).load())
        except _Refused as e:
            raise UnsafePickleError(path, f"{e}; the file was not loaded") from None
        except _TooLarge as e:
            raise CorruptDatasetError(path, f"{e}; the file was not loaded") from None
        except MemoryError:
            raise CorruptDatasetError(path, "it asks for more memory than there is; the file was not loaded") from None
        except pickle.UnpicklingError as e:
            raise CorruptDatasetError(path, f"not a valid pickle ({e})") from e
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise CorruptDatasetError(path, f"not a valid pickle ({type(e).__name__}: {e})") from e
