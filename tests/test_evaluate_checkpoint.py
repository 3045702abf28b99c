"""evaluate_checkpoint: one "AutoAttack a run's checkpoint on its test points" for the trainer, the
CLI, the quickstart and the benchmarks (issue 22) -- the run's own test points (its
data.train_subset / test_subset / seed), an offset into them, the suite, per-point outcomes."""
import pytest
import torch

from _extras import need

need("sklearn", "pyautoattack")

from rb_labelrefine.config import load_config
from rb_labelrefine.data import build_datasets
from rb_labelrefine.evaluation import AUTOATTACK_SUITES, evaluate_checkpoint, run_autoattack, stack_test_points
from rb_labelrefine.runs import load_run_model
from rb_labelrefine.training.trainer import Trainer

FAST = {"apgd.n_iter": 5}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch digits run trained on a training subset and scored on a *test subset*."""
    out = tmp_path_factory.mktemp("ec") / "run"
    cfg = load_config("digits-pgdat", ["train.epochs=1", "attack.steps=1", "data.train_subset=64",
                                       "data.test_subset=40", "train.threads=1", "eval.val_attack_steps=1",
                                       "eval.test_attack_steps=1", "eval.curve_test_size=16"])
    Trainer(cfg, out, progress=False).fit()
    return out, cfg


def test_the_points_are_the_runs_own_test_subset_from_the_offset(run):
    out, cfg = run
    res = evaluate_checkpoint(out, "final", n=6, offset=5, attacks=["apgd-ce"], attack_params=FAST)
    assert (res["which"], res["offset"], res["suite"], res["n"]) == ("final", 5, "custom", 6)
    assert len(res["robust_correct"]) == 6 and set(res["per_attack_correct"]) == {"clean", "apgd-ce"}
    # the same as AutoAttack on items 5..10 of the run's test split built with its subsets
    d = cfg.data
    _, _, sub, _ = build_datasets(d.name, val_fraction=d.val_fraction, train_subset=d.train_subset, seed=d.seed,
                                  test_subset=d.test_subset)
    x, y = stack_test_points(sub, 6, 5)
    model, _, _ = load_run_model(out, "final")
    ref = run_autoattack(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps, version="custom",
                         attacks=["apgd-ce"], attack_params=FAST, seed=0)
    assert res["robust_correct"] == ref["robust_correct"] and res["clean_acc"] == ref["clean_acc"]
    # (the drift this replaces: the split without the run's test_subset holds other points)
    _, _, whole, _ = build_datasets(d.name, val_fraction=d.val_fraction, seed=d.seed)
    assert not torch.equal(stack_test_points(whole, 6, 5)[0], x)


def test_a_loaded_model_and_its_test_data_are_used_as_given(run, monkeypatch):
    import rb_labelrefine.evaluation.autoattack as aa

    out, cfg = run
    seen = {}

    def fake(model, x, y, **kw):
        seen.update(kw, x=x, y=y)
        return {"robust_acc": 0.0, "clean_acc": 0.0, "n": len(y), "robust_correct": [0] * len(y)}

    monkeypatch.setattr(aa, "run_autoattack", fake)
    data = [(torch.full((1, 8, 8), float(i)), i % 10) for i in range(10)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    res = evaluate_checkpoint(model=model, cfg=cfg, test_data=data, offset=7, suite="apgd", seed=3,
                              batch_size=5, eps=0.2, device="cpu")
    assert seen["y"].tolist() == [7, 8, 9] and seen["x"][0, 0, 0, 0] == 7.0   # all from the offset on
    assert seen["version"] == "custom" and seen["attacks"] == ["apgd-ce", "apgd-t"]
    assert seen["attack_params"] == {"apgd.n_restarts": 1} and seen["eps"] == 0.2 and seen["norm"] == "Linf"
    assert (seen["seed"], seen["batch_size"], seen["device"]) == (3, 5, "cpu")
    assert res["suite"] == "apgd" and res["which"] == "best"
    evaluate_checkpoint(model=model, cfg=cfg, test_data=data, n=2, suite="standard", attack_params={"x": 1})
    assert seen["y"].tolist() == [0, 1]
    assert seen["version"] == "standard" and seen["attacks"] is None and seen["attack_params"] == {"x": 1}
    assert seen["eps"] == cfg.attack.eps
    xy = stack_test_points(data)   # points already stacked (the trainer's checked ones): the same slice
    evaluate_checkpoint(model=model, cfg=cfg, test_data=xy, n=2, offset=7, suite="standard")
    assert seen["y"].tolist() == [7, 8] and torch.equal(seen["x"], xy[0][7:9])


@pytest.mark.parametrize("kw, msg", [
    ({"suite": "fast"}, "suite must be one of standard, plus, rand, apgd"),
    ({"offset": 10}, r"offset must be an integer in \[0, 10\)"),
    ({"offset": -1}, r"offset must be an integer in \[0, 10\)"),
    ({"n": 0}, "n must be a positive integer"),
    ({"cfg": None}, "a model given without its run's cfg"),
])
def test_bad_arguments_are_named(run, kw, msg):
    data = [(torch.zeros(1, 8, 8), 0)] * 10
    args = {"model": torch.nn.Flatten(), "cfg": run[1], "test_data": data, **kw}
    with pytest.raises(ValueError, match=msg):
        evaluate_checkpoint(**args)
    with pytest.raises(ValueError, match="needs run_dir, or model and cfg"):
        evaluate_checkpoint()
    assert set(AUTOATTACK_SUITES) == {"standard", "plus", "rand", "apgd"}
