"""The benchmark scripts run (tiny settings) and write what their README promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rb_labelrefine.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_robust_overfitting_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--methods",
           "pgd_at", "adr", "--seeds", "0", "--jobs", "1", "--out", str(tmp_path / "runs"), "--results-dir",
           str(tmp_path / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    for name in ("pgd_at", "adr"):
        rec = res["methods"][name]
        for which in ("best", "final"):
            assert set(rec[which]) >= {"epoch", "clean", "pgd20", "autoattack"}
        assert rec["curve"]
    assert list((tmp_path / "results").glob("*.md")) and list((tmp_path / "results").glob("*.png"))


def test_robust_overfitting_missing_data_is_a_clear_error(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robust_overfitting.py"), "--preset", "smoke", "--methods",
           "pgd_at", "--seeds", "0", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
           "--results-dir", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr + proc.stdout
