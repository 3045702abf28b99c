"""The README's user-loop example runs as written."""
import re
from pathlib import Path

import torch

from _extras import need

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_user_loop_runs_as_written():
    need("torchattacks")                         # the loop is a torchattacks user's
    blocks = [b for b in _python_blocks() if "rect.after_step(model)" in b]
    assert blocks, "the README lost its user-loop example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    rect = ns["rect"]
    assert rect.step == len(ns["loader"]) * ns["epochs"]
    assert rect.temperature == 2.0 and abs(rect.interpolation - 0.95) < 1e-9
    assert torch.isfinite(ns["loss"])


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    cmd = re.search(r'pip install -e "\.\[all,test\]" && (python3 -m pytest -q)', README.read_text()).group(1)
    assert ci.strip().splitlines()[-1] == cmd
