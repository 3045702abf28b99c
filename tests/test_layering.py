"""Specification: data flows one way -- config -> parts -> trainer -> run directory -> evaluation ->
export.  The run-file layer (``runs.py``), the file layer (``fileio.py``) and everything export,
evaluation and the rectifiers are built from import nothing of ``training/``; ``training.io`` stays
importable as the file layer under its former name."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rb_labelrefine"
BELOW_TRAINING = ["runs.py", "fileio.py", "plots.py", "safe_files.py", "errors.py", "export", "evaluation", "rectifiers",
                  "models", "data"]


def _imports(path: Path) -> set:
    """Every module a file imports, at its top or inside a function, as an absolute dotted name."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from . import training`
    return out


def _files(entry: str) -> list:
    p = PKG / entry
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("entry", BELOW_TRAINING)
def test_the_layers_under_the_trainer_import_nothing_of_training(entry):
    for f in _files(entry):
        bad = sorted(m for m in _imports(f) if m == "rb_labelrefine.training" or m.startswith("rb_labelrefine.training."))
        assert not bad, f"{f.relative_to(PKG.parent)} imports {bad}"


def test_reading_and_writing_run_files_loads_no_trainer(tmp_path):
    code = ("import sys, torch\n"
            "from rb_labelrefine import runs, fileio, export\n"
            f"p = runs.write_weights(torch.nn.Linear(2, 2), {str(tmp_path / 'w.safetensors')!r}, {{'epoch': 1}})\n"
            "runs.read_weights(p)\n"
            f"fileio.atomic_torch_save({{'a': torch.ones(1)}}, {str(tmp_path / 'c.pt')!r})\n"
            f"fileio.safe_torch_load({str(tmp_path / 'c.pt')!r})\n"
            "print(sorted(m for m in sys.modules if m.startswith('rb_labelrefine.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_io_is_the_file_layer_and_the_run_lock_under_their_former_name():
    from rb_labelrefine import errors, fileio
    from rb_labelrefine.training import io, lock

    for name in ("atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
                 "safe_torch_load", "remove_stale_temps", "ensure_writable_dir"):
        assert getattr(io, name) is getattr(fileio, name), name
    assert io.RunLock is lock.RunLock and io.LOCK_FILE == lock.LOCK_FILE == ".rb_labelrefine.lock"
    assert io.StorageError is fileio.StorageError is errors.StorageError
    assert io.UnsafeCheckpointError is errors.UnsafeCheckpointError
