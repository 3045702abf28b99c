"""A pickle loader that can read the CIFAR batches (protocols 2-5) and nothing more dangerous.

The CIFAR python batches are pickled dicts of bytes, lists and numpy arrays. Unpickling them
with plain ``pickle.load`` would execute whatever a tampered file asks for (``__reduce__`` can
name any callable, e.g. ``os.system``), so :class:`RestrictedUnpickler` resolves only the few
globals numpy needs to rebuild an array (``_reconstruct`` + ``ndarray.__setstate__`` for
protocols 2-4, ``_frombuffer`` for protocol 5's in-band buffers) and refuses everything else
before it is ever called.

Memory is bounded by what the file really holds, not by what it claims: the file (at most
:data:`MAX_FILE_BYTES`) is read once and unpickled from memory (a length field cannot make a read
allocate more); every array an allowed global builds is charged, before it is allocated, to a
budget of the file's own size (+ :data:`SLACK_BYTES`), so a 138-byte file cannot claim a gigabyte
through zero strides, an array without data, or one data string shared through the memo by many
arrays; arrays with strides other than the contiguous ones and object arrays are refused.  The
loaded containers are copied once with their sharing kept (a memo-shared list of lists stays a
graph, it is not expanded into a tree) and at most :data:`MAX_DEPTH` levels deep.
"""
from __future__ import annotations

import importlib
import io
import math
import pickle
from pathlib import Path

import numpy as np

from .errors import CorruptDatasetError, UnsafePickleError

__all__ = ["RestrictedUnpickler", "safe_load_pickle", "MAX_ARRAY_BYTES", "MAX_FILE_BYTES"]

# The largest array a data pickle may build (CIFAR-100's training batch: 50000 x 3072 bytes = 147 MiB).
MAX_ARRAY_BYTES = 1 << 30
MAX_FILE_BYTES = 1 << 30      # the largest data pickle read (CIFAR-100's train: 155 MB)
SLACK_BYTES = 1 << 16         # array bytes beyond the file's size (headers of tiny arrays)
MAX_DEPTH = 64                # nesting of lists / dicts / tuples in a data pickle (CIFAR: 2)

# (module, name) -> (module to import, attribute). ``numpy.core`` became ``numpy._core`` in numpy 2;
# files written by either numpy name either, so both spellings map to whichever exists.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    # protocol 5: numpy pickles a contiguous array as _frombuffer(<bytearray>, dtype, shape, order)
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
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


def _dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise _TooLarge(f"an array of an unknown dtype {str(dtype)[:40]!r} ({exc})") from None
    if dt.hasobject:
        raise _Refused("refusing an array of Python objects: a data file holds numbers only")
    return dt


def _dims(shape) -> tuple:
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, (tuple, list)) or len(dims) > 32 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise _TooLarge(f"an array of shape {str(shape)[:60]} (dimensions must be non-negative integers)")
    return tuple(dims)


def _check_size(shape, dtype) -> int:
    """The bytes an array of ``shape`` and ``dtype`` holds; refused above :data:`MAX_ARRAY_BYTES`."""
    dims, dt = _dims(shape), _dtype(dtype)
    n = math.prod(dims) * max(dt.itemsize, 1)
    if n > MAX_ARRAY_BYTES:
        raise _TooLarge(f"an array of shape {dims} ({n:,} bytes) is larger than any data file holds "
                        f"(limit {MAX_ARRAY_BYTES:,} bytes); refused before allocating it")
    return n


class _Budget:
    """The array bytes a file may still build: its own size (+ slack), charged before allocating."""

    def __init__(self, limit: int, what: str = "arrays"):
        self.limit, self.left, self.what = limit, limit, what

    def take(self, nbytes: int, shape) -> None:
        if nbytes > self.left:
            raise _TooLarge(f"its {self.what} claim more bytes than the file holds (one of shape {tuple(shape)} "
                            f"needs {nbytes:,} bytes, {self.left:,} of the file's {self.limit:,} are left): shared "
                            "or missing data, refused before allocating it")
        self.left -= nbytes


class _BoundedArray(np.ndarray):
    """Base of what the file's ``numpy.ndarray`` resolves to (one subclass per load, holding that
    load's budget): calling it checks shape, strides and budget first and returns a plain ndarray;
    as ``_reconstruct``'s subtype, its ``__setstate__`` charges the state's bytes before numpy
    fills the array.  Instances are turned back into plain arrays after loading (:func:`_plain`)."""

    _budget: _Budget = None

    def __new__(cls, shape, dtype=float, buffer=None, offset=0, strides=None, order=None):
        n = _check_size(shape, dtype)
        dims, dt = _dims(shape), _dtype(dtype)
        if strides is not None and n:
            contiguous = [np.ndarray(dims, dt, order=o).strides for o in ("C", "F")]
            if not isinstance(strides, (tuple, list)) or tuple(strides) not in contiguous:
                raise _TooLarge(f"an array of shape {dims} with strides {tuple(strides)[:8]}: only contiguous "
                                "arrays are read (zero or overlapping strides repeat bytes the file does not hold)")
        cls._budget.take(n, dims)
        return np.ndarray(dims, dt, buffer, offset, strides, order)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _TooLarge("an array state of an unknown form")
        shape, dtype = state[-4], state[-3]
        self._budget.take(_check_size(shape, dtype), _dims(shape))
        super().__setstate__(state)


def _bounded_reconstruct(real, array_type):
    def reconstruct(subtype, shape, dtype):
        if subtype is not array_type:
            raise _Refused("refusing _reconstruct of anything but numpy.ndarray")
        n = _check_size(shape, dtype)
        array_type._budget.take(n, _dims(shape))
        return real(subtype, shape, dtype)
    return reconstruct


def _bounded_frombuffer(budget: _Budget):
    def frombuffer(buf, dtype, shape, order):
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise _Refused(f"refusing _frombuffer of a {type(buf).__name__}: a data pickle passes bytes")
        n = _check_size(shape, dtype)
        if n != memoryview(buf).nbytes:
            raise _TooLarge(f"an array of shape {tuple(_dims(shape))} needs {n:,} bytes, its buffer holds "
                            f"{memoryview(buf).nbytes:,}")
        if order not in ("C", "F"):
            raise _TooLarge(f"an array of order {str(order)[:10]!r}")
        budget.take(n, _dims(shape))
        return np.frombuffer(buf, dtype=_dtype(dtype)).reshape(_dims(shape), order=order)
    return frombuffer


class _TooDeep(ValueError):
    pass


def _plain(obj, memo=None, depth: int = 0):
    """``obj`` with the load's array subclasses turned into plain arrays; shared containers stay
    shared (memo by identity) and nesting is bounded by :data:`MAX_DEPTH`."""
    if memo is None:
        memo = {}
    if isinstance(obj, np.ndarray):
        return obj.view(np.ndarray) if isinstance(obj, _BoundedArray) else obj
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key][0]
    if depth >= MAX_DEPTH:
        raise _TooDeep(f"containers nested more than {MAX_DEPTH} levels deep (a CIFAR batch: 2)")
    if isinstance(obj, dict):
        out = {}
        memo[key] = (out, obj)
        for k, v in obj.items():
            out[_plain(k, memo, depth + 1)] = _plain(v, memo, depth + 1)
    elif isinstance(obj, list):
        out = []
        memo[key] = (out, obj)
        out.extend(_plain(v, memo, depth + 1) for v in obj)
    else:
        out = tuple(_plain(v, memo, depth + 1) for v in obj)
        memo[key] = (out, obj)
    return out


def _resolve(module: str, name: str):
    if module == "_latin1":
        return _latin1_encode
    if module in ("multiarray", "numeric"):
        try:  # numpy >= 2: import the new location directly, avoiding numpy.core's deprecation shim
            mod = importlib.import_module(f"numpy._core.{module}")
        except ImportError:
            mod = importlib.import_module(f"numpy.core.{module}")
    else:
        mod = importlib.import_module(module)
    return getattr(mod, name)


class _Refused(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` allows only numpy array reconstruction, every
    array charged to a budget of ``budget_bytes`` (default: :data:`MAX_ARRAY_BYTES`)."""

    def __init__(self, file, *args, budget_bytes: int = MAX_ARRAY_BYTES, **kwargs):
        super().__init__(file, *args, **kwargs)
        self.budget = _Budget(budget_bytes)
        self.array_type = type("_LoadArray", (_BoundedArray,), {"_budget": self.budget})
        # bytes made from text (protocol 2): one memo-shared string encoded a million times must
        # not become a million copies -- their own budget of the same size
        self.bytes_budget = _Budget(budget_bytes, "byte strings")

    def _encode(self, obj, encoding="utf-8", errors="strict"):
        if isinstance(obj, str):
            self.bytes_budget.take(len(obj), (len(obj),))
        return _latin1_encode(obj, encoding, errors)

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise _Refused(
                f"refusing to load global '{module}.{name}': only numpy arrays are allowed in a "
                "data file (a genuine CIFAR batch holds nothing else)")
        if target == ("numpy", "ndarray"):
            return self.array_type
        if target[0] == "_latin1":
            return self._encode
        if target[1] == "_reconstruct":
            return _bounded_reconstruct(_resolve(*target), self.array_type)
        if target[1] == "_frombuffer":
            return _bounded_frombuffer(self.budget)
        return _resolve(*target)


def safe_load_pickle(path, encoding: str = "bytes"):
    """Load a data pickle through :class:`RestrictedUnpickler`.

    The file must be a regular file of at most :data:`MAX_FILE_BYTES`; its arrays may hold at
    most its own size (+ :data:`SLACK_BYTES`) in all.

    Raises:
        UnsafePickleError: the file references a callable other than numpy's array rebuilders.
        CorruptDatasetError: the file is truncated, not a pickle, or claims more than it holds.
    """
    from ..safe_files import UnsafeFileError, read_bytes

    path = Path(path)
    try:
        raw = read_bytes(path, max_bytes=MAX_FILE_BYTES)
    except UnsafeFileError as e:
        raise CorruptDatasetError(path, e.problem) from None
    unpickler = RestrictedUnpickler(io.BytesIO(raw), encoding=encoding,
                                    budget_bytes=min(len(raw) + SLACK_BYTES, MAX_ARRAY_BYTES))
    try:
        return _plain(unpickler.load())
    except _Refused as e:
        raise UnsafePickleError(path, f"{e}; the file was not loaded") from None
    except (_TooLarge, _TooDeep) as e:
        raise CorruptDatasetError(path, f"{e}; the file was not loaded") from None
    except RecursionError:
        raise CorruptDatasetError(path, "nested too deeply; the file was not loaded") from None
    except MemoryError:
        raise CorruptDatasetError(path, "it asks for more memory than there is; the file was not loaded") from None
    except pickle.UnpicklingError as e:
        raise CorruptDatasetError(path, f"not a valid pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as e:
        raise CorruptDatasetError(path, f"not a valid pickle ({type(e).__name__}: {str(e)[:200]})") from None
