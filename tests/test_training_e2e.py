"""A few steps of end-to-end training per method and per companion, on a tiny model (CPU)."""
import json

import pytest
import torch

from _extras import need

need("sklearn")

from rb_labelrefine.config import load_config
from rb_labelrefine.runs import load_run_model, read_weights
from rb_labelrefine.training.trainer import NonFiniteLossError, Trainer

TINY = ["data.name=synthetic", "data.batch_size=32", "data.val_fraction=0.125", "model.arch=mlp",
        "attack.eps=0.1", "attack.alpha=0.05", "attack.steps=2", "train.epochs=2", "train.threads=1",
        "eval.curve_test_size=32", "eval.val_attack_steps=2", "eval.test_attack_steps=2",
        "train.reference_steps_per_epoch=null"]


def _train(tmp_path, name, preset, extra=()):
    cfg = load_config(preset, TINY + list(extra))
    return Trainer(cfg, tmp_path / name, progress=False).fit()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    _train(root, "natural", "digits-natural")
    _train(root, "robust", "digits-pgdat")
    return root


def _check_run(summary, run_dir):
    for key in ("best", "final", "config", "history"):
        assert (run_dir / summary["paths"][key].split("/")[-1]).exists()
    hist = json.loads((run_dir / "history.json").read_text())
    assert len(hist) == 2 and all(0 <= r["test_pgd"] <= r["test_clean"] + 1e-9 for r in hist)
    assert summary["best_epoch"] in (1, 2)
    model, cfg, info = load_run_model(run_dir, "final")
    x = torch.rand(2, info.channels, info.image_size, info.image_size)
    assert model(x).shape == (2, info.num_classes)


@pytest.mark.parametrize("preset,extra", [
    ("digits-pgdat", []),
    ("digits-trades", []),
    ("digits-ls", []),
    ("digits-adr", []),
    ("digits-trades-adr", []),
    ("digits-sglr", []),
    ("digits-sglr", ["method.variant=code", "method.start_epoch=2"]),   # hard labels in epoch 1, soft in 2
])
def test_method_trains(tmp_path, preset, extra):
    s = _train(tmp_path, "run", preset, extra)
    _check_run(s, tmp_path / "run")
    assert s["method"] == load_config(preset).method.name


def test_kd_swa_trains_with_self_teachers(tmp_path, teachers):
    s = _train(tmp_path, "kd", "digits-kd-swa", [f"method.robust_teacher={teachers / 'robust'}",
                                                f"method.standard_teacher={teachers / 'natural' / 'best.safetensors'}",
                                                "swa.start_epoch=0"])
    _check_run(s, tmp_path / "kd")
    assert s["eval_model"] == "swa"


@pytest.mark.parametrize("extra", [[], ["awp.enabled=true"]])
def test_ltd_trains_with_natural_teacher(tmp_path, teachers, extra):
    s = _train(tmp_path, "ltd", "digits-ltd", [f"method.teacher={teachers / 'natural'}"] + extra)
    _check_run(s, tmp_path / "ltd")
    assert s["objective"] == "trades"


@pytest.mark.parametrize("companions", [
    ["wa.enabled=true"],
    ["awp.enabled=true"],
    ["swa.enabled=true", "swa.start_epoch=0"],
    ["wa.enabled=true", "awp.enabled=true"],
])
@pytest.mark.parametrize("objective", ["pgd_at", "trades"])
def test_companions_with_adr(tmp_path, companions, objective):
    s = _train(tmp_path, "run", "digits-adr", companions + [f"objective.name={objective}"])
    _check_run(s, tmp_path / "run")
    expected = "swa" if "swa.enabled=true" in companions else ("ema" if "wa.enabled=true" in companions else "raw")
    assert s["eval_model"] == expected


def test_adr_shares_the_wa_ema_as_its_teacher(tmp_path):
    cfg = load_config("digits-adr-wa", TINY)
    tr = Trainer(cfg, tmp_path / "r", progress=False)
    tr.fit()
    assert tr.rectifier.teacher is tr.wa                   # one EMA, not two
    assert int(tr.wa.num_updates) == tr.global_step         # updated once per step
    best, _ = read_weights(tmp_path / "r" / "final.safetensors")
    assert all(torch.equal(best[k], v) for k, v in tr.wa.module.state_dict().items())


def test_decays_are_rescaled_to_epochs(tmp_path):
    cfg = load_config("digits-adr-wa", TINY[:-1] + ["train.reference_steps_per_epoch=391"])
    tr = Trainer(cfg, tmp_path / "r", progress=False)
    s = tr.fit()
    spe = s["steps_per_epoch"]
    assert s["effective_decays"]["wa"] == pytest.approx(0.995 ** (391 / spe))


def test_training_improves_over_chance(tmp_path):
    s = _train(tmp_path, "run", "digits-adr", ["train.epochs=4", "optim.lr=0.1"])
    assert s["final"]["test_clean"] > 30.0   # 10 classes: chance is 10 %


def test_sglr_memory_is_rolled_back_with_a_non_finite_step(tmp_path):
    """SGLR writes its memory in after_step, so the step the trainer abandons for a non-finite
    loss leaves it untouched and the last good state is checkpointed (not 'no longer finite')."""
    cfg = load_config("digits-sglr", TINY + ["optim.lr=1e30", "train.device=cpu"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    steps = []
    orig = trainer.train_step

    def record(*a, **k):
        out = orig(*a, **k)
        steps.append(trainer.rectifier.memory.clone())
        return out
    trainer.train_step = record
    with pytest.raises(NonFiniteLossError, match=r"the last good state \(before this step\) is in") as exc:
        trainer.fit()
    assert steps and "step 2" in str(exc.value)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    memory = state["rectifier"]["memory"]
    assert torch.isfinite(memory).all() and torch.equal(memory, steps[-1].cpu())
    assert int(state["rectifier"]["seen"].sum()) == 32   # the first batch's rows only


@pytest.mark.parametrize("val_attack", ["pgd_margin", "pgd_dlr"])
def test_selection_by_a_non_ce_validation_attack_keeps_both_bests(tmp_path, val_attack):
    summary = _train(tmp_path, "run", "digits-adr", [f"eval.val_attack={val_attack}", "train.epochs=3"])
    run = tmp_path / "run"
    hist = json.loads((run / "history.json").read_text())
    key = f"val_{val_attack}"
    assert all(0 <= r[key] <= r["val_clean"] + 1e-9 and "val_pgd" in r for r in hist)
    # best = argmax of the chosen attack (first of ties), best_pgd_ce = argmax of CE PGD
    pick = lambda k: max(range(len(hist)), key=lambda i: (hist[i][k], -i)) + 1  # noqa: E731
    assert summary["best_epoch"] == pick(key) and summary["best"]["val_attack"] == val_attack
    assert summary["best"]["score"] == hist[pick(key) - 1][key]
    assert summary["best_pgd_ce_epoch"] == pick("val_pgd") and key in summary["final"]
    assert int(read_weights(run / "best_pgd_ce.safetensors")[1]["epoch"]) == pick("val_pgd")
    assert int(read_weights(run / "best.safetensors")[1]["epoch"]) == pick(key)
    load_run_model(run, "best_pgd_ce")


def test_ce_selection_writes_no_second_best(tmp_path):
    summary = _train(tmp_path, "run", "digits-pgdat")
    assert not (tmp_path / "run" / "best_pgd_ce.safetensors").exists() and "best_pgd_ce" not in summary
    assert summary["best"]["val_attack"] == "pgd_ce"
    from rb_labelrefine.config import ConfigError

    with pytest.raises(ConfigError, match="eval.val_attack"):
        load_config("digits-pgdat", ["eval.val_attack=apgd"])
