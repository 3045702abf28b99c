"""A pickle loader that can read the CIFAR batches and nothing more dangerous.

The CIFAR python batches are pickled dicts of bytes, lists and numpy arrays. Unpickling them
with plain ``pickle.load`` would execute whatever a tampered file asks for (``__reduce__`` can
name any callable, e.g. ``os.system``), so :class:`RestrictedUnpickler` resolves only the few
globals numpy needs to rebuild an array and refuses everything else before it is ever called.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

from .errors import CorruptDatasetError, UnsafePickleError

__all__ = ["RestrictedUnpickler", "safe_load_pickle"]

# (module, name) -> (module to import, attribute). ``numpy.core`` became ``numpy._core`` in numpy 2;
# files written by either numpy name either, so both spellings map to whichever exists.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


def _resolve(module: str, name: str):
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
            return RestrictedUnpickler(f, encoding=encoding).load()
        except _Refused as e:
            raise UnsafePickleError(path, f"{e}; the file was not loaded") from None
        except pickle.UnpicklingError as e:
            raise CorruptDatasetError(path, f"not a valid pickle ({e})") from e
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise CorruptDatasetError(path, f"not a valid pickle ({type(e).__name__}: {e})") from e
