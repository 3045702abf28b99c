"""`rb-labelrefine doctor`: exit 0 on this healthy install; exit 1 naming robustbench and the repair
command when one of RobustBench's files has been changed.  The damaged RobustBench is a *copy* of the
installed one (package + dist-info) put first on PYTHONPATH -- the real site-packages is never touched."""
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rb_labelrefine import doctor
from rb_labelrefine.compat import robustbench_files

REPO = Path(__file__).resolve().parents[1]
REPAIR = "pip install --force-reinstall --no-deps robustbench=="


def _robustbench_copy(tmp_path: Path) -> Path:
    """``tmp_path/site`` holding a copy of the installed robustbench package and its dist-info."""
    try:
        dist = md.distribution("robustbench")
    except md.PackageNotFoundError:
        pytest.skip("needs robustbench (extra [robustbench])")
    init = Path(dist.locate_file("robustbench/__init__.py"))
    if not init.is_file() or not any(f.hash for f in dist.files or []):
        pytest.skip("robustbench is not installed from a wheel with a RECORD (e.g. an editable install)")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copytree(init.parent, site / "robustbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(dist._path), site / Path(dist._path).name)
    return site


def _doctor(env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rb_labelrefine", "doctor"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


def test_doctor_exits_0_on_this_healthy_install():
    proc = _doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for item in ("torch", "autoattack", "robustbench", "requests", "timm", "torchattacks", "matplotlib",
                 "scikit-learn", "huggingface_hub", "tensorboard", "wandb", "Fashion-MNIST"):
        assert any(l.split()[1:2] == [item] for l in lines if l[:5].strip() in ("ok", "warn", "--")), (item, lines)
    assert not any(l.startswith("FAIL") for l in lines) and lines[-1].startswith("healthy")


def test_doctor_names_robustbench_and_the_repair_when_a_file_was_changed(tmp_path):
    site = _robustbench_copy(tmp_path)
    with open(site / "robustbench" / "utils.py", "a") as f:
        f.write("\n# changed, as torchattacks' wheel changes it\n")
    proc = _doctor({"PYTHONPATH": str(site)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fail = [l for l in proc.stdout.splitlines() if l.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].split()[1] == "robustbench" and "robustbench/utils.py" in fail[0]
    version = md.distribution("robustbench").version
    assert f"repair: {REPAIR}{version}" in proc.stdout
    assert "1 problem(s): robustbench" in proc.stdout


def test_a_robustbench_shadowed_by_another_copy_is_found(tmp_path):
    """A venv over a system RobustBench: torchattacks' robustbench/ is what `import` finds."""
    site = _robustbench_copy(tmp_path)
    shadow = tmp_path / "shadow"
    shutil.copytree(site / "robustbench", shadow / "robustbench")      # a package without a distribution
    proc = _doctor({"PYTHONPATH": os.pathsep.join([str(shadow)])})
    assert proc.returncode == 1 and "import robustbench` finds" in proc.stdout and REPAIR in proc.stdout


def test_the_damage_check_reads_the_record(tmp_path, monkeypatch):
    """In-process, on the copy: intact, then one changed and one deleted file."""
    site = _robustbench_copy(tmp_path)
    dist = md.Distribution.at(next(site.glob("robustbench-*.dist-info")))
    monkeypatch.setattr(doctor, "_distribution", lambda name: dist if name == "robustbench" else None)
    monkeypatch.setattr(robustbench_files, "robustbench_origin", lambda: str(site / "robustbench" / "__init__.py"))
    assert doctor.robustbench_damage(dist) is None and doctor.check_robustbench_files().verdict == "ok"
    (site / "robustbench" / "eval.py").write_text("# overwritten\n")
    (site / "robustbench" / "zenodo_download.py").unlink()
    d = doctor.robustbench_damage(dist)
    assert d["changed"] == ["robustbench/eval.py"] and d["missing"] == ["robustbench/zenodo_download.py"]
    item = doctor.check_robustbench_files()
    assert item.verdict == "FAIL" and item.repair == f"{REPAIR}{dist.version}"


def test_a_damaged_robustbench_is_refused_at_import_with_the_repair(tmp_path):
    """The error a damaged RobustBench causes (AttributeError: corruptions_3d, exit 70) now names the
    damage, the repair and the doctor, from the package's one door to RobustBench and from the CLI."""
    site = _robustbench_copy(tmp_path)
    with open(site / "robustbench" / "model_zoo" / "enums.py", "a") as f:
        f.write("\n# changed\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "from rb_labelrefine.compat.robustbench import import_robustbench\n"
                           "import_robustbench()"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode != 0 and "DamagedDependencyError" in proc.stderr
    assert "robustbench/model_zoo/enums.py" in proc.stderr and REPAIR in proc.stderr and "doctor" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rb_labelrefine", "leaderboard", "--autoattack", "50", "--n", "10000"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0                     # what does not need RobustBench still works


def test_requests_checks(monkeypatch):
    class D:
        def __init__(self, version, requires=()):
            self.version, self.requires, self.files = version, list(requires), []

    dists = {"robustbench": D("1.1.1", ["requests >=2.25.0"]), "requests": D("2.25.1", ["urllib3 <1.27,>=1.21.1"]),
             "urllib3": D("2.2.0")}
    monkeypatch.setattr(doctor, "_distribution", lambda name: dists.get(name))
    req, ul = doctor.check_requests()
    assert req.verdict == "warn" and "torchattacks" in req.detail          # the pin torchattacks brings
    assert ul.verdict == "FAIL" and ul.repair == "pip install --upgrade requests urllib3"
    dists["requests"] = D("2.24.0", ["urllib3 <1.26,>=1.21.1"])
    assert doctor.check_requests()[0].verdict == "FAIL"
