"""Make ``import autoattack`` (and so ``import robustbench``) work on PyPI's ``pyautoattack``.

RobustBench does ``from autoattack import AutoAttack`` -- the GitHub package's name -- while
PyPI's official AutoAttack installs the module ``pyautoattack``, whose ``AutoAttack`` class also
has a different interface.  This module registers a meta-path finder that answers for the name
``autoattack`` *only* when no other finder on ``sys.meta_path`` knows it, i.e. when the real
GitHub ``autoattack`` is not installed, and only when ``pyautoattack`` is.  It then builds the
adapter module of :mod:`rb_labelrefine.compat.robustbench` (the classic interface over
pyautoattack) and aliases ``autoattack.<sub>`` to ``pyautoattack.<sub>``.

The installed package copies this file to site-packages as ``_rb_labelrefine_autoattack.py``
with a ``.pth`` line that calls :func:`install` at interpreter start (see ``build_backend/``), so
``python -c "import robustbench"`` works with no extra step.  It imports only ``sys`` there and
does nothing until something imports ``autoattack``: start-up cost is one class definition.
:func:`rb_labelrefine.compat.robustbench.import_robustbench` calls :func:`install` too, for a
source checkout on ``PYTHONPATH`` that has no ``.pth``.

Stdlib only, and no import of rb_labelrefine at module level: it runs inside ``site``.
"""
import sys

MARK = "_rb_labelrefine_autoattack_finder"
SHIM_MARK = "__rb_labelrefine_shim__"


class AutoattackFinder:
    """Meta-path finder for ``autoattack`` / ``autoattack.*`` of last resort (see the module doc)."""

    _rb_labelrefine_autoattack_finder = True

    @classmethod
    def _others_find(cls, name, path, target):
        for finder in list(sys.meta_path):
            if getattr(finder, MARK, False) or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec(name, path, target)
            except (ImportError, ValueError):
                spec = None
            if spec is not None:
                return True
        return False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "autoattack" and not name.startswith("autoattack."):
            return None
        import importlib.machinery
        import importlib.util

        if name == "autoattack":
            if cls._others_find(name, path, target):
                return None                      # the real GitHub autoattack: step aside
            try:
                if importlib.util.find_spec("pyautoattack") is None:
                    return None
            except (ImportError, ValueError):
                return None
            return importlib.machinery.ModuleSpec(name, _ShimLoader(), is_package=True)
        parent = sys.modules.get("autoattack")
        if parent is None or not getattr(parent, SHIM_MARK, False):
            return None
        target_name = "pyautoattack" + name[len("autoattack"):]
        try:
            if importlib.util.find_spec(target_name) is None:
                return None
        except (ImportError, ValueError):
            return None
        return importlib.machinery.ModuleSpec(name, _AliasLoader(target_name))

    @classmethod
    def invalidate_caches(cls):
        pass


class _ShimLoader:
    def create_module(self, spec):
        # Any failure here -- pyautoattack broken (a RuntimeError or AttributeError at its import, a
        # missing dependency of it), rb_labelrefine itself half-installed -- is an ImportError of
        # ``autoattack``: without the hook the name would not import either, and a program's own
        # ``try: import autoattack / except ImportError`` must keep working.
        try:
            from rb_labelrefine.compat.robustbench import build_shim_module

            return build_shim_module()
        except ImportError as exc:
            raise ImportError(f"autoattack: the pyautoattack adapter cannot be built ({exc})",
                              name=spec.name) from exc
        except Exception as exc:  # noqa: BLE001 - see above: every failure is "autoattack is not importable"
            raise ImportError(f"autoattack: pyautoattack is installed but broken ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); reinstall it: pip install --force-reinstall pyautoattack",
                              name=spec.name) from exc

    def exec_module(self, module):
        pass  # build_shim_module() filled it; the spec (a package) gave it __path__ = []


class _AliasLoader:
    """``autoattack.<sub>`` is the very module object ``pyautoattack.<sub>``."""

    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        import importlib

        try:
            module = importlib.import_module(self.target)
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken pyautoattack submodule: ImportError, as above
            raise ImportError(f"{spec.name}: {self.target} is installed but broken ({type(exc).__name__}: "
                              f"{str(exc)[:300]})", name=spec.name) from exc
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # importlib overwrote it with the alias spec: keep the real one


def install():
    """Append the finder to ``sys.meta_path`` once (a copy from site-packages or this module)."""
    if not any(getattr(f, MARK, False) for f in sys.meta_path):
        sys.meta_path.append(AutoattackFinder)
