"""`import robustbench` works right after installing the package, with `pip install .` and with
`pip install -e .`, through the `.pth` hook the build backend adds -- and the hook costs nothing at
interpreter start and steps aside for a real GitHub `autoattack`.

Each install goes into a throwaway venv that sees this environment's packages
(``--system-site-packages``, ``--no-deps``, ``--no-build-isolation``: nothing is downloaded).
"""
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from _extras import need

need("pyautoattack")
REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent("""
    import json, sys
    start = sorted(m for m in sys.modules if m.split(".")[0] in
                   ("rb_labelrefine", "_rb_labelrefine_autoattack", "torch", "pyautoattack", "autoattack",
                    "robustbench", "numpy"))
    hook_finders = [type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path
                    if getattr(f, "_rb_labelrefine_autoattack_finder", False)]
    if sys.argv[1] == "robustbench":
        import robustbench, robustbench.eval
        aa = robustbench.eval.AutoAttack
    else:  # the same finder, without the seconds of robustbench's import
        import autoattack
        aa = autoattack.AutoAttack
    import autoattack.state, pyautoattack.state
    print(json.dumps({
        "start": start, "hook_finders": hook_finders,
        "aa_class": aa.__module__ + "." + aa.__name__,
        "state_is_pyautoattack": autoattack.state is pyautoattack.state,
        "state_spec": pyautoattack.state.__spec__.name,
        "rb_file": __import__("rb_labelrefine").__file__,
    }))
""")


def _env(extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # only what the venv installed
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return env


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    out = {}
    for mode in ("regular", "editable"):
        d = tmp_path_factory.mktemp(f"venv_{mode}")
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(d)
        py = d / "bin" / "python"
        target = ["-e", str(REPO)] if mode == "editable" else [str(REPO)]
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                               "--no-build-isolation", "--no-index", *target],
                              capture_output=True, text=True, env=_env(), cwd=d)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[mode] = py
    return out


def _probe(py, cwd, what):
    import json

    proc = subprocess.run([str(py), "-c", _PROBE, what], capture_output=True, text=True, env=_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_import_robustbench_just_works_after_install(venvs, mode, tmp_path):
    r = _probe(venvs[mode], tmp_path, "robustbench" if mode == "regular" else "autoattack")
    # at start-up: only the hook module, no rb_labelrefine, torch or pyautoattack import
    assert r["start"] == ["_rb_labelrefine_autoattack"] and r["hook_finders"] == ["AutoattackFinder"]
    assert r["aa_class"] == "rb_labelrefine.compat.robustbench.ClassicAutoAttack"
    assert r["state_is_pyautoattack"] and r["state_spec"] == "pyautoattack.state"
    where = Path(r["rb_file"]).resolve()
    if mode == "editable":
        assert where.is_relative_to(REPO)
    else:
        assert not where.is_relative_to(REPO) and "site-packages" in where.parts


def test_hook_steps_aside_for_the_real_autoattack(venvs, tmp_path):
    pkg = tmp_path / "real" / "autoattack"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("class AutoAttack:\n    pass\n")
    (pkg / "state.py").write_text("class EvaluationState:\n    pass\n")
    code = ("import robustbench.eval, autoattack\n"
            "assert robustbench.eval.AutoAttack is autoattack.AutoAttack\n"
            "print(robustbench.eval.AutoAttack.__module__, autoattack.__file__)")
    proc = subprocess.run([str(venvs["regular"]), "-c", code], capture_output=True, text=True,
                          env=_env(tmp_path / "real"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mod, path = proc.stdout.split()
    assert mod == "autoattack" and Path(path).resolve() == (pkg / "__init__.py").resolve()


def test_uninstall_removes_the_hook(venvs, tmp_path):
    py = venvs["regular"]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pth = Path(site) / "rb_labelrefine_autoattack.pth"
    assert pth.read_text().startswith("import _rb_labelrefine_autoattack")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "uninstall", "-y", "-q", "rb-labelrefine"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not pth.exists() and not (Path(site) / "_rb_labelrefine_autoattack.py").exists()
