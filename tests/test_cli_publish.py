"""Publishing from the command line alone: train -> eval --json -> export --results -> leaderboard."""
import json
import os
import subprocess
import sys

import pytest

from _extras import need

need("sklearn", "pyautoattack", "robustbench")

from rb_labelrefine.cli import main  # noqa: E402

FAST = ["--quiet", "--set", "train.epochs=1", "--set", "attack.steps=2", "--set", "train.threads=1"]


def _cli(*argv):
    """The installed entry point's code path in a fresh process (no Python written by the user)."""
    return subprocess.run([sys.executable, "-m", "rb_labelrefine", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_digits_run_published_from_the_cli(tmp_path):
    run, exp = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--config", "digits-pgdat", "--out", str(run), *FAST]) == 0
    ev = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--n", "16", "--attacks", "apgd-ce",
                 "--sanity", "--json", str(ev)]) == 0
    res = json.loads(ev.read_text())
    assert res["which"] == "best" and res["checkpoint"] == str(run) and "sanity" in res
    assert main(["export", "--checkpoint", str(run), "--out", str(exp), "--results", str(ev),
                 "--name", "Cli2026_PGDAT_digits"]) == 0
    info_path = exp / "model_info" / "digits" / "Linf" / "Cli2026_PGDAT_digits.json"
    info = json.loads(info_path.read_text())
    aa = res["autoattack"]
    # per point, after the suite and after each of its stages (here: clean, then APGD-CE)
    assert list(aa["per_attack_correct"]) == ["clean", "apgd-ce"] and len(aa["robust_correct"]) == 16
    assert aa["per_attack_correct"]["apgd-ce"] == aa["robust_correct"]
    assert info["autoattack_acc"] == str(round(aa["robust_acc"], 2)) and info["clean_acc"] == str(round(aa["clean_acc"], 2))
    card = (exp / "README.md").read_text()
    assert f"{aa['robust_acc']:.2f}%" in card and "Gradient-masking sanity checks were not run" not in card
    assert "| best | " in card and "16 test points" in card
    # a digits model has no RobustBench leaderboard: the CLI says so (exit 2), it does not rank it
    lb = _cli("leaderboard", "--model-info", str(info_path))
    assert lb.returncode == 2 and "the result is for digits, not cifar10" in lb.stderr

    # results of the other checkpoint, or of another run, are refused with the reason
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--results", str(ev),
                 "--which", "final"]) == 2
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--results",
                 str(tmp_path / "missing.json")]) == 2


def test_cifar_shaped_run_ranks_on_the_leaderboard_from_the_cli(tmp_path, capsys):
    run, exp = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--config", "digits-pgdat", "--out", str(run), *FAST, "--set", "data.name=synthetic",
                 "--set", "model.arch=tiny_cnn", "--set", "attack.eps=0.03137254901960784",
                 "--set", "attack.alpha=0.00784313725490196"]) == 0
    ev = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--n", "16", "--attacks", "apgd-ce", "--json", str(ev)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(exp), "--results", str(ev), "--dataset", "cifar10",
                 "--name", "Cli2026_PGDAT_tiny"]) == 0
    info_path = exp / "model_info" / "cifar10" / "Linf" / "Cli2026_PGDAT_tiny.json"
    capsys.readouterr()
    lb = _cli("leaderboard", "--model-info", str(info_path))
    assert lb.returncode == 0, lb.stderr
    aa = json.loads(ev.read_text())["autoattack"]["robust_acc"]
    assert f"AutoAttack {aa:.2f}%" in lb.stdout and "all entries: #" in lb.stdout
    assert "without extra data: #" in lb.stdout
    assert "NOT COMPARABLE: measured on 16 test points, the leaderboard on 10,000" in lb.stdout
    # the eval JSON itself says the data were synthetic: ranking it directly is refused
    direct = _cli("leaderboard", "--results", str(ev))
    assert direct.returncode == 2 and "the result is for synthetic, not cifar10" in direct.stderr
