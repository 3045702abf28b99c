"""The quickstart pipeline end to end (reduced: 2 epochs, AutoAttack on 16 points), and
AutoAttack on the exported model reproduces the accuracy recorded in its model card."""
import json
import re

import torch

from _extras import need

need("sklearn", "matplotlib", "pyautoattack")

from rb_labelrefine.cli import main
from rb_labelrefine.data import build_datasets
from rb_labelrefine.evaluation.autoattack import run_autoattack
from rb_labelrefine.export.robustbench_export import load_exported
from rb_labelrefine.quickstart import run_quickstart
from rb_labelrefine.evaluation import stack_test_points

N = 16


def test_quickstart_writes_everything_and_the_card_matches_autoattack(tmp_path):
    out = tmp_path / "qs"
    fast = {"square.n_queries": 50, "apgd.n_iter": 20, "apgd_targeted.n_iter": 20, "apgd_targeted.n_target_classes": 2,
            "fab.n_iter": 20, "fab.n_target_classes": 2}
    summary = run_quickstart(out, progress=False, autoattack_n=N, jobs=1, attack_params=fast,
                             overrides=["train.epochs=2", "attack.steps=3"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["methods"].keys() == {"pgd_at", "adr"}
    for m, rec in on_disk["methods"].items():
        for key in ("clean_acc", "autoattack_acc", "best_epoch"):
            assert rec[key] is not None
        assert rec["autoattack_n"] == N
        assert 0 <= rec["autoattack_acc"] <= rec["clean_acc"] <= 100
        for p in ("best", "final", "history", "config"):
            assert (tmp_path / rec["paths"][p]).exists() or __import__("pathlib").Path(rec["paths"][p]).exists()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = summary["methods"]["adr"]["paths"]["export"]
    card = open(export["model_card"]).read()
    assert card.startswith("---\n") and "model-index" in card

    # AutoAttack on the exported model gives the accuracy recorded in the card / model_info
    model = load_exported(export["safetensors"])
    _, _, test_ds, _ = build_datasets("digits", val_fraction=0.1, seed=0)
    x, y = stack_test_points(test_ds, N)
    again = run_autoattack(model, x, y, norm="Linf", eps=0.1, version="standard", seed=0, attack_params=fast)
    recorded = summary["methods"]["adr"]["autoattack_acc"]
    assert abs(again["robust_acc"] - recorded) < 1e-9
    info = json.loads(open(export["model_info"]).read())
    assert float(info["autoattack_acc"]) == round(recorded, 2)
    assert f"{recorded:.2f}%" in card


def test_cli_eval_on_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "digits-pgdat", "--out", str(run), "--quiet", "--set", "train.epochs=1",
                 "--set", "attack.steps=2", "--set", "train.threads=1"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--n", "8", "--attacks", "apgd-ce", "--json",
                 str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["autoattack"]["n"] == 8 and res["dataset"] == "digits"
    assert re.search(r"AutoAttack \(custom\) [\d.]+% on 8 points", capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
