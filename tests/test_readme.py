"""The README runs as printed.

Rules (what each example of README.md gets):

* every ```python block is executed, in README order, in one namespace (the blocks continue one
  another as the README presents them: the TRADES recipe uses the user loop's model and loader),
  in a fresh working directory; their own settings are already tiny (256 random 3x8x8 images);
* every line of a fenced ```bash block that starts with ``rb-labelrefine`` is run as printed, in
  that same kind of working directory, in README order (the README marks those blocks as tiny
  settings), and must exit 0 -- except ``quickstart`` (5-6 minutes on the 2-core CPU) and commands
  that need data this machine cannot download (CIFAR: a ``--config cifar*`` train), which get the
  third rule;
* every other ``rb-labelrefine ...`` line (synopsis block, inline code spans) must name a real
  subcommand, and every ``--option`` on it must be one that subcommand accepts; a line without
  synopsis brackets (``[``/``|``) must also parse (argparse would reject e.g. several ``--set``
  pairs after one flag as "unrecognized arguments").
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from _extras import need

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def _fenced(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", TEXT, flags=re.S)


def _cli_lines():
    """``(line, where)`` for every rb-labelrefine command line: fenced blocks (continuation lines
    joined) and inline code spans."""
    out = []
    for lang in ("bash", ""):
        for block in _fenced(lang):
            joined = re.sub(r"\n\s{6,}(?=[\[-])", " ", block)          # synopsis continuation lines
            for line in joined.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("rb-labelrefine "):
                    out.append((line, "bash" if lang == "bash" else "synopsis"))
    for span in re.findall(r"`(rb-labelrefine [^`]+)`", TEXT):
        out.append((span.strip(), "inline"))
    return out


def _runnable(line: str) -> bool:
    argv = shlex.split(line)
    if argv[1] == "quickstart":
        return False            # 5-6 minutes on the 2-core CPU (README: measured); flags checked instead
    if argv[1] == "train" and re.search(r"--config (cifar|tinyimagenet)", line):
        return False            # CIFAR / Tiny ImageNet cannot be downloaded here
    return True


def test_readme_python_blocks_run_as_printed(tmp_path, monkeypatch):
    need("torchattacks")                         # the user loop is a torchattacks user's
    blocks = _python_blocks()
    assert len(blocks) >= 3, "the README lost an example"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
    # what the user loop promises: ADR's schedule ran to its end, and was saved and restored
    loop = next(b for b in blocks if "rect.after_step(model)" in b and "checkpoint.pt" in b)
    ns2: dict = {}
    exec(compile(loop, "README.md", "exec"), ns2)
    rect = ns2["rect"]
    assert rect.step == len(ns2["loader"]) * ns2["epochs"]
    assert rect.temperature == 2.0 and abs(rect.interpolation - 0.95) < 1e-9
    assert torch.isfinite(ns2["loss"])
    assert torch.load("checkpoint.pt", weights_only=True)["rect"]["step"] == rect.step


def test_readme_cli_lines_are_real_commands():
    from rb_labelrefine.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    lines = _cli_lines()
    assert len(lines) >= 15 and {l.split()[1] for l, _ in lines} >= {"train", "eval", "export", "leaderboard",
                                                                     "configs", "doctor", "quickstart"}
    for line, where in lines:
        tokens = line.replace("[", " ").replace("]", " ").replace("|", " ").split()
        sub = tokens[1]
        assert sub in subs, f"README ({where}): unknown subcommand in {line!r}"
        known = {o for a in subs[sub]._actions for o in a.option_strings}
        for t in tokens[2:]:
            opt = t.split("=")[0]
            if opt.startswith("--"):
                assert opt in known, f"README ({where}): {sub} has no option {opt} ({line!r})"
        if "[" not in line and "|" not in line and "…" not in line and "..." not in line:
            parser.parse_args(shlex.split(line)[1:])   # SystemExit(2) on anything argparse rejects


def test_readme_bash_commands_run_as_printed(tmp_path):
    need("sklearn", "robustbench")               # the digits set; eval and export use AutoAttack
    lines = [l for l, where in _cli_lines() if where == "bash" and _runnable(l)]
    assert any(l.split()[1] == "train" for l in lines) and any(l.split()[1] == "export" for l in lines)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for line in lines:
        argv = shlex.split(line)
        proc = subprocess.run([sys.executable, "-m", "rb_labelrefine", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # the chain's results: an export with the README's model_info, evaluated from its directory
    info = next((tmp_path / "exports").rglob("model_info/*/*/*.json"))
    import json

    mi = json.loads(info.read_text())
    assert mi["name"] == "My ADR digits model" and mi["authors"] == "A. Author, B. Author"
    assert mi["link"] == "https://example.org/paper" and mi["venue"] == "Workshop 2026" and mi["eps"] == "0.1"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    cmd = re.search(r'pip install -e "\.\[all,test\]" && (python3 -m pytest -q)', TEXT).group(1)
    assert ci.strip().splitlines()[-1] == cmd


def test_readme_makes_one_statement_about_import_robustbench():
    """The README once said `import robustbench` just works and elsewhere that it fails out of the box."""
    assert "fails out of the box" not in TEXT
    assert len(re.findall(r"\*\*`import robustbench`\*\*", TEXT)) == 1
