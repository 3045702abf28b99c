"""PGD-k, official AutoAttack, the gradient-masking sanity report, and RobustBench's benchmark.

Models are a few thousand parameters and data a few dozen points so the file runs in seconds
on two CPU cores.  What the RobustBench test covers is spelled out in its docstring.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _extras import need

need("pyautoattack")

from rb_labelrefine.data.errors import CorruptDatasetError, DatasetNotFoundError
from rb_labelrefine.config import VAL_ATTACK_NAMES
from rb_labelrefine.evaluation import (
    VAL_ATTACKS, attack_loss, benchmark, clean_accuracy, format_sanity_markdown, load_rb_data, pgd_accuracy,
    pgd_attack, pgd_correct, run_autoattack, sanity_report,
)

CHEAP = {"apgd.n_iter": 10, "apgd.n_restarts": 1}


def _mlp(in_dim=3 * 8 * 8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _points(model, n=50, shape=(3, 8, 8), seed=1):
    """Random images labelled by the model itself: 100% clean accuracy, so attacks have work."""
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


class Quantised(nn.Module):
    """Gradient masking by construction: rounding the input has zero gradient everywhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


# ----------------------------------------------------------------------------- PGD

def test_pgd_on_a_non_robust_model_goes_to_zero_at_large_eps():
    model = _mlp()
    x, y = _points(model)
    assert clean_accuracy(model, (x, y)) == 100.0
    assert pgd_accuracy(model, (x, y), eps=0.0, steps=5) == 100.0
    small = pgd_accuracy(model, (x, y), eps=2 / 255, steps=10)
    large = pgd_accuracy(model, (x, y), eps=0.5, steps=20)
    assert large == 0.0 and small > large
    assert pgd_accuracy(model, (x, y), eps=20.0, steps=20, norm="L2") == 0.0


def test_pgd_respects_the_ball_and_the_box_and_restores_mode():
    model = _mlp()
    x, y = _points(model, n=8)
    for norm, eps in (("Linf", 0.05), ("L2", 0.5)):
        x_adv = pgd_attack(model, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm,
                           generator=torch.Generator().manual_seed(0))
        d = (x_adv - x).flatten(1)
        size = d.abs().max(1)[0] if norm == "Linf" else d.norm(dim=1)
        assert float(size.max()) <= eps + 1e-5
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    model.train()
    pgd_accuracy(model, (x, y), eps=0.03, steps=2)
    assert model.training   # evaluated in eval mode, mode restored


def test_pgd_accepts_loaders_with_indices_and_n_ex():
    model = _mlp()
    x, y = _points(model, n=20)
    loader = DataLoader(TensorDataset(x, y, torch.arange(20)), batch_size=6)
    assert clean_accuracy(model, loader, n_ex=10) == 100.0
    a = pgd_accuracy(model, loader, eps=8 / 255, steps=5, seed=3)
    b = pgd_accuracy(model, (x, y), eps=8 / 255, steps=5, seed=3, batch_size=6)
    assert a == b   # same batches, same seeded random starts
    # restarts share the seeded generator, so the first restart repeats the single run: more
    # restarts can only lower the per-sample worst case
    assert pgd_accuracy(model, loader, eps=8 / 255, steps=5, restarts=3, seed=3) <= a
    with pytest.raises(ValueError, match="unknown norm"):
        pgd_accuracy(model, loader, eps=0.1, norm="L3")


# ----------------------------------------------------------------------------- AutoAttack

def test_margin_and_dlr_losses_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    # margin: best wrong logit minus the true one
    assert torch.allclose(attack_loss(z, y, "margin"), torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    # DLR: margin / (z_pi1 - z_pi3); sorted rows (3, 1, 0, -1) and (5, 2, 1, 0)
    assert torch.allclose(attack_loss(z, y, "dlr"), torch.tensor([-2.0 / 3.0, 3.0 / 4.0]))
    assert torch.allclose(attack_loss(z, y, "ce"), torch.nn.functional.cross_entropy(z, y, reduction="none"))
    # DLR is invariant to shifting and (positively) scaling the logits; the margin scales with them
    assert torch.allclose(attack_loss(7 * z - 3, y, "dlr"), attack_loss(z, y, "dlr"))
    assert torch.allclose(attack_loss(7 * z - 3, y, "margin"), 7 * attack_loss(z, y, "margin"))
    with pytest.raises(ValueError, match="at least 3 classes"):
        attack_loss(torch.zeros(2, 2), torch.tensor([0, 1]), "dlr")
    with pytest.raises(ValueError, match="unknown attack loss 'cw'"):
        attack_loss(z, y, "cw")
    assert set(VAL_ATTACKS) == set(VAL_ATTACK_NAMES)   # the config's list is the evaluator's


@pytest.mark.parametrize("loss", ["margin", "dlr"])
def test_margin_and_dlr_pgd_are_valid_attacks(loss):
    model = _mlp()
    x, y = _points(model)
    eps = 4 / 255
    g = torch.Generator().manual_seed(0)
    x_adv = pgd_attack(model, x, y, eps=eps, alpha=eps / 4, steps=10, generator=g, loss=loss)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before, after = attack_loss(model(x), y, loss), attack_loss(model(x_adv), y, loss)
    assert (after >= before - 1e-6).float().mean() > 0.9 and after.mean() > before.mean()
    # it finds mistakes, seeded without the global RNG: same answer twice, global stream untouched
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = pgd_correct(model, (x, y), eps=0.1, steps=10, seed=3, loss=loss)
    assert torch.equal(torch.get_rng_state(), state)
    b = pgd_correct(model, (x, y), eps=0.1, steps=10, seed=3, loss=loss)
    assert a.dtype == torch.bool and a.shape == (len(y),) and torch.equal(a, b)
    assert a.float().mean() < 1.0
    assert pgd_accuracy(model, (x, y), eps=0.1, steps=10, seed=3, loss=loss) == 100.0 * a.float().mean().item()
    with pytest.raises(ValueError, match="unknown attack loss"):
        pgd_correct(model, (x, y), eps=0.1, loss="hinge")


def test_pgd_correct_is_per_point_and_in_data_order():
    model = _mlp()
    x, y = _points(model, n=40)
    y_wrong = y.clone()
    y_wrong[::2] = (y[::2] + 1) % 10   # even points misclassified on the clean input
    out = pgd_correct(model, DataLoader(TensorDataset(x, y_wrong), batch_size=7), eps=0.0, steps=1)
    assert out.tolist() == [i % 2 == 1 for i in range(40)]


def test_autoattack_custom_on_a_tiny_model():
    model = _mlp()
    x, y = _points(model, n=40)
    res = run_autoattack(model, x, y, eps=8 / 255, version="custom", attacks=["apgd-ce", "apgd-t"],
                         attack_params={**CHEAP, "apgd_targeted.n_iter": 10, "apgd_targeted.n_target_classes": 2},
                         n_ex=15, batch_size=8)
    assert res["n"] == 15
    assert res["clean_acc"] == 100.0 and 0.0 <= res["robust_acc"] <= res["clean_acc"]
    # per point, in data order: the robust accuracy is their mean (the paired comparisons' input)
    assert len(res["robust_correct"]) == 15 and set(res["robust_correct"]) <= {0, 1}
    assert 100.0 * sum(res["robust_correct"]) / 15 == res["robust_acc"]
    assert res["backend"] in ("pyautoattack", "autoattack") and res["backend_version"]
    assert set(res["per_attack"]) <= {"apgd-ce", "apgd-t"} and "apgd-ce" in res["per_attack"]
    assert res["per_attack"]["apgd-ce"] >= res["robust_acc"] - 1e-9
    assert res["perturbation_ok"] and res["max_perturbation"] <= 8 / 255 + 1e-5
    assert res["standard"] is False and res["attacks"] == ["apgd-ce", "apgd-t"]
    assert res["elapsed_s"] > 0 and res["machine"]["device"] == "cpu"
    l2 = run_autoattack(model, x, y, norm="L2", eps=0.5, version="custom", attacks=["apgd-ce"],
                        attack_params=CHEAP, n_ex=10)
    assert l2["n"] == 10 and l2["norm"] == "L2" and l2["perturbation_ok"]


def test_autoattack_bad_arguments_error_clearly():
    model = _mlp()
    x, y = _points(model, n=4)
    with pytest.raises(ValueError, match="AutoAttack supports"):
        run_autoattack(model, x, y, norm="L3")
    with pytest.raises(ValueError, match="choose one of"):
        run_autoattack(model, x, y, version="fast")
    with pytest.raises(ValueError, match="choose from"):
        run_autoattack(model, x, y, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="only used with version='custom'"):
        run_autoattack(model, x, y, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        run_autoattack(model, x * 255, y, version="custom", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="component"):
        run_autoattack(model, x, y, version="custom", attacks=["apgd-ce"], attack_params={"pgd.steps": 3})


# ----------------------------------------------------------------------------- sanity report

SANITY = dict(n_ex=50, square_queries=40, steps_grid=(5, 10, 20), eps_sweep_steps=10, autoattack_iters=10)


def test_sanity_report_passes_a_healthy_model():
    model = _mlp()
    x, y = _points(model)
    rep = sanity_report(model, (x, y), eps=8 / 255, **SANITY)
    assert set(rep["checks"]) == {"eps_sweep", "steps_sweep", "black_box", "autoattack_flags", "zero_gradient"}
    for check in rep["checks"].values():
        assert check["passed"] in (True, False) and check["reason"]
    es = rep["checks"]["eps_sweep"]
    assert es["acc"][-1] == 0.0 and len(es["acc"]) == len(es["eps"])
    assert rep["passed"] is True and rep["failed"] == [] and rep["n"] == 50
    md = format_sanity_markdown(rep)
    assert "all checks that ran passed" in md and "| accuracy vs eps" in md


def test_sanity_report_flags_a_gradient_masked_model():
    net = _mlp()
    masked = Quantised(net).eval()
    x, y = _points(masked)
    rep = sanity_report(masked, x, y, eps=8 / 255, **SANITY)   # (model, x, y) form works too
    assert rep["passed"] is False
    # PGD cannot move (zero gradients), so accuracy stays high however large eps gets...
    assert "eps_sweep" in rep["failed"] and rep["checks"]["eps_sweep"]["acc"][-1] > 2.0
    # ...every point has an all-zero input gradient, and AutoAttack's own check says so too.
    assert "zero_gradient" in rep["failed"]
    assert rep["checks"]["zero_gradient"]["n_zero"] == rep["checks"]["zero_gradient"]["n_correct"] > 0
    assert "autoattack_flags" in rep["failed"]
    assert any("zero gradient" in f for f in rep["checks"]["autoattack_flags"]["flags"])
    assert "**FAIL**" in format_sanity_markdown(rep)


def test_sanity_report_marks_skipped_checks_not_measured():
    model = _mlp()
    x, y = _points(model, n=20)
    rep = sanity_report(model, (x, y), autoattack=False, **{**SANITY, "n_ex": 20})
    assert rep["checks"]["autoattack_flags"]["passed"] is None and rep["not_measured"] == ["autoattack_flags"]
    assert "not measured" in format_sanity_markdown(rep)
    assert "not measured" in format_sanity_markdown(None)


# ----------------------------------------------------------------------------- RobustBench

def _write_tiny_cifar10(root, x_uint8, labels):
    """CIFAR-10's on-disk layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta},
    each a pickled dict with 'data' (uint8 [N, 3072], channel-major rows) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, data, labs):
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": [int(v) for v in labs],
                         "filenames": [f"{name}_{i}.png" for i in range(len(labs))]}, f, protocol=2)

    for i in range(1, 6):
        dump(f"data_batch_{i}", x_uint8[:2], labels[:2])
    dump("test_batch", x_uint8, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 2,
                     "num_vis": 3072}, f, protocol=2)


def test_robustbench_benchmark_runs_on_tiny_cifar(tmp_path, monkeypatch):
    """What this covers: ``rb_labelrefine.evaluation.benchmark`` -> ``robustbench.eval.benchmark``
    unchanged -> ``robustbench.data.load_cifar10`` -> torchvision's ``CIFAR10`` reading real
    pickle batches from ``data_dir`` -> clean accuracy -> ``AutoAttack(model, norm=, eps=,
    version='standard', device=, log_path=)`` through the classic adapter ->
    ``run_standard_evaluation(x, y, bs=, state_path=)`` -> adversarial accuracy.

    The only thing replaced is torchvision's MD5 check (``torchvision.datasets.cifar.check_integrity``,
    in this test only): the real files' checksums cannot be produced by 16 made-up images.  It
    still requires every file to exist.  The model is a linear map, which AutoAttack's first
    attack (APGD-CE) breaks completely at 8/255, so the standard run stays fast and the later
    attacks (APGD-T, FAB-T, Square) are skipped by AutoAttack itself ("no robust points left").
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    rng = np.random.default_rng(0)
    x_uint8 = rng.integers(0, 256, size=(16, 3072), dtype=np.uint8)
    with torch.no_grad():   # label each image with the model's own prediction: 100% clean accuracy
        labels = model(torch.from_numpy(x_uint8).float().div(255).view(-1, 3, 32, 32)).argmax(1).numpy()
    _write_tiny_cifar10(tmp_path, x_uint8, labels)

    # Without the real checksums the pre-flight check refuses, before any download attempt.
    with pytest.raises(CorruptDatasetError, match="MD5"):
        benchmark(model, dataset="cifar10", n_examples=8, data_dir=tmp_path)

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    x, y = load_rb_data("cifar10", 12, tmp_path)
    assert x.shape == (12, 3, 32, 32) and torch.equal(y, torch.as_tensor(labels[:12]))
    assert torch.allclose(x.flatten(1) * 255, torch.from_numpy(x_uint8[:12]).float(), atol=1e-3)

    res = benchmark(model, dataset="cifar10", threat_model="Linf", n_examples=12, data_dir=tmp_path,
                    batch_size=16)
    assert res["n"] == 12 and res["eps"] == pytest.approx(8 / 255)
    assert res["clean_acc"] == 100.0 and res["robust_acc"] == 0.0
    assert res["version"] == "standard" and res["backend"] in ("pyautoattack", "autoattack")
    assert res["robustbench_version"] == "1.1.1"
    # the same AutoAttack through our own entry point agrees
    ours = run_autoattack(model, x, y, eps=8 / 255, version="standard", batch_size=16)
    assert ours["robust_acc"] == res["robust_acc"] and ours["clean_acc"] == res["clean_acc"]


def test_robustbench_names_and_missing_data_error_clearly(tmp_path):
    model = nn.Identity()
    with pytest.raises(ValueError, match=r"unknown RobustBench dataset 'cifar11'.*cifar10.*cifar100.*imagenet"):
        benchmark(model, dataset="cifar11")
    with pytest.raises(ValueError, match=r"unknown RobustBench threat model 'Linfty'.*Linf.*L2.*corruptions"):
        benchmark(model, threat_model="Linfty")
    with pytest.raises(ValueError, match="unknown RobustBench dataset"):
        load_rb_data("mnist", 10, tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        load_rb_data("cifar100", 10, tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "test") in msg and "cs.toronto.edu" in msg
    with pytest.raises(DatasetNotFoundError, match="val"):
        load_rb_data("imagenet", 10, tmp_path)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10-C"):
        load_rb_data("cifar10", 10, tmp_path, threat_model="corruptions")


# Reduced settings for all four standard stages (seconds on two cores).  The stage-by-stage
# reference below passes the same values to each custom call, plus what version='standard'
# sets itself (autoattack.py _set_version, Linf: restarts 1, Square's queries).
TINY_SUITE = {"apgd.n_iter": 3, "apgd_targeted.n_iter": 3, "apgd_targeted.n_target_classes": 2,
              "fab.n_iter": 3, "fab.n_target_classes": 2, "square.n_queries": 10}
STANDARD_SET = {"apgd.n_restarts": 1, "apgd_targeted.n_restarts": 1, "fab.n_restarts": 1}


def _stage_by_stage(model, x, y, eps, attack_params, batch_size):
    """Each standard stage as its own version='custom' call on the points still robust."""
    alive = torch.ones(len(y), dtype=torch.bool)
    with torch.no_grad():
        alive &= model(x).argmax(1) == y
    flags = {"clean": alive.clone()}
    for stage in ("apgd-ce", "apgd-t", "fab-t", "square"):
        idx = alive.nonzero().flatten()
        if len(idx) == 0:
            break
        r = run_autoattack(model, x[idx], y[idx], eps=eps, version="custom", attacks=[stage], seed=0,
                           attack_params={**STANDARD_SET, **attack_params}, batch_size=batch_size,
                           stage_points=False)
        alive[idx] = torch.tensor(r["robust_correct"], dtype=torch.bool)
        flags[stage] = alive.clone()
    return {k: v.int().tolist() for k, v in flags.items()}


def test_autoattack_per_stage_points_are_the_single_runs_flags():
    model = _mlp()
    x, y = _points(model, n=14)
    y[:2] = (y[:2] + 1) % 10  # two clean mistakes: the clean stage is not all ones
    eps, bs = 3 / 255, 5      # 12 -> 7 -> 6 points: two batches of 5 per stage, re-formed as the set shrinks
    res = run_autoattack(model, x, y, eps=eps, version="standard", attack_params=TINY_SUITE, batch_size=bs)
    stages = res["per_attack_correct"]
    assert list(stages) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(len(f) == 14 and set(f) <= {0, 1} for f in stages.values())
    assert stages["clean"][:2] == [0, 0] and 100.0 * sum(stages["clean"]) / 14 == res["clean_acc"]
    for stage in res["attacks"]:  # AutoAttack logs each stage's accuracy rounded to 0.01 %
        assert abs(100.0 * sum(stages[stage]) / 14 - res["per_attack"][stage]) <= 0.005 + 1e-9
    names = list(stages)
    for prev, cur in zip(names, names[1:]):  # monotone: robust after a stage => robust before it
        assert all(p >= c for p, c in zip(stages[prev], stages[cur])), (prev, cur)
    assert stages["square"] == res["robust_correct"]
    assert sum(stages["clean"]) > sum(stages["apgd-ce"]) > sum(stages["apgd-t"])  # APGD-T removes points after CE
    # Recording changes nothing about the run, and costs nothing when switched off.
    off = run_autoattack(model, x, y, eps=eps, version="standard", attack_params=TINY_SUITE, batch_size=bs,
                         stage_points=False)
    assert "per_attack_correct" not in off
    assert off["robust_correct"] == res["robust_correct"] and off["per_attack"] == res["per_attack"]
    # The same flags from running the stages one by one (independent of the recording hook).
    assert _stage_by_stage(model, x, y, eps, TINY_SUITE, bs) == stages
