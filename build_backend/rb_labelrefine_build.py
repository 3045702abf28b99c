"""PEP 517 backend: setuptools, plus the ``autoattack`` import hook placed in site-packages.

``import robustbench`` must work right after ``pip install "rb-labelrefine[robustbench]"``,
without the user importing anything first (see ``rb_labelrefine/compat/autoattack_hook.py``).
Only a ``.pth`` file at the top of site-packages runs at interpreter start, and setuptools has no
option that puts one there in both a regular and an editable (PEP 660) wheel.  So both wheels are
built by setuptools and then get two more files at their root:

* ``_rb_labelrefine_autoattack.py`` -- a copy of the hook module (stdlib only, imports nothing
  of rb_labelrefine or torch until ``autoattack`` is imported);
* ``rb_labelrefine_autoattack.pth`` -- one line that registers the hook's meta-path finder.

The wheel's ``RECORD`` lists them with their hashes, so ``pip uninstall`` removes them.
"""
import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook unchanged)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_SOURCE = os.path.join(_ROOT, "rb_labelrefine", "compat", "autoattack_hook.py")
HOOK_MODULE = "_rb_labelrefine_autoattack.py"
PTH_FILE = "rb_labelrefine_autoattack.pth"
PTH_LINE = "import _rb_labelrefine_autoattack; _rb_labelrefine_autoattack.install()\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def add_hook_files(wheel_path: str) -> None:
    """Rewrite ``wheel_path`` with the hook module and its ``.pth`` at the wheel's root."""
    with open(HOOK_SOURCE, "rb") as f:
        extra = {HOOK_MODULE: f.read(), PTH_FILE: PTH_LINE.encode()}
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            if info.filename == record or info.filename in extra:
                continue
            dst.writestr(info, src.read(info.filename))
        lines = [ln for ln in src.read(record).decode().splitlines(keepends=True)
                 if ln.split(",", 1)[0] not in extra]
        for name, data in extra.items():
            dst.writestr(name, data)
            lines.insert(-1 if lines and lines[-1].startswith(record + ",") else len(lines), _record_line(name, data))
        dst.writestr(record, "".join(lines))
    os.replace(tmp, wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_hook_files(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_hook_files(os.path.join(wheel_directory, name))
    return name
