"""The training switches from the CLI (issue 23, item 7): ``train.log`` and ``history.csv``,
``train.tensorboard``, ``model.init_from``, ``train.accum_steps`` and extending a finished run with
``--resume`` and more ``train.epochs`` -- each one resuming bit-exactly after a SIGTERM mid-epoch
(compared with an uninterrupted run by test_reliability's ``_assert_same_run``)."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from _extras import need
from rb_labelrefine import cli
from rb_labelrefine.config import ConfigError, load_config
from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training.trainer import Trainer
from test_reliability import _assert_same_run, stop_after_steps, teacher_pt  # noqa: F401 (fixtures)

TINY = ["model.arch=mlp", "data.train_subset=192", "data.batch_size=32", "attack.steps=2", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=2", "eval.curve_test_size=64"]


def _train(capsys, out, *sets, resume=False, preset="digits-pgdat"):
    argv = ["train", "--config", preset, "--out", str(out), "--quiet", "--set", *TINY, *sets]
    capsys.readouterr()
    rc = cli.main(argv + (["--resume"] if resume else []))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _interrupted_then_resumed(capsys, stop_after_steps, out, sets, stops=(4,)):
    """The CLI run, SIGTERM after each of ``stops`` (exit 3), resumed until done (exit 0)."""
    stop_after_steps(list(stops))
    rc, _, err = _train(capsys, out, *sets)
    for _ in stops:
        assert rc == 3, err
        rc, _, err = _train(capsys, out, *sets, resume=True)
    assert rc == 0, err


@pytest.fixture(scope="module")
def src_run(tmp_path_factory) -> Path:
    """A finished tiny run (mlp) to start other runs from."""
    out = tmp_path_factory.mktemp("switches") / "src"
    assert cli.main(["train", "--config", "digits-pgdat", "--out", str(out), "--quiet", "--set", *TINY]) == 0
    return out


def _hash_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- train.log, history.csv

def test_every_run_writes_train_log_and_history_csv_appended_on_resume(capsys, tmp_path, stop_after_steps):
    _interrupted_then_resumed(capsys, stop_after_steps, tmp_path / "run", [], stops=(3, 8))
    run = tmp_path / "run"
    log = (run / RUN_FILES["log"]).read_text()
    # the first process's lines are still there (appended, never truncated), then the resumes, then the end
    assert log.index("received SIGTERM") < log.index("resumed from") < log.index("epoch 2/2") < log.index("finished:")
    assert log.count("resumed from") == 2 and log.count("epoch 1/2 |") == 1
    assert log.count("stopped. Resume with:") == 2 and log.index("stopped.") < log.index("resumed from")
    history = json.loads((run / RUN_FILES["history"]).read_text())
    rows = list(csv.DictReader((run / RUN_FILES["history_csv"]).open()))
    assert len(rows) == len(history) == 2
    for row, rec in zip(rows, history):
        assert set(row) == set(rec)
        for k, v in rec.items():
            assert (float(row[k]) == pytest.approx(v, rel=1e-12)) if isinstance(v, float) else row[k] == str(v), k
    _train(capsys, tmp_path / "ref")
    _assert_same_run(run, tmp_path / "ref")


def test_a_refused_resume_changes_nothing_including_train_log(capsys, tmp_path):
    run = tmp_path / "run"
    assert _train(capsys, run)[0] == 0
    before = _hash_tree(run)
    rc, _, err = _train(capsys, run, "attack.steps=3", resume=True)
    assert rc == 2 and "different config" in err and "attack.steps" in err
    rc, _, err = _train(capsys, run, resume=True)   # finished, same config: nothing to do
    assert rc == 0 and "nothing changed" in err
    assert _hash_tree(run) == before


# ----------------------------------------------------------------------------- tensorboard

def test_tensorboard_event_files_hold_the_history_scalars(capsys, tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, _, err = _train(capsys, tmp_path / "run", "train.tensorboard=true")
    assert rc == 0, err
    acc = EventAccumulator(str(tmp_path / "run" / RUN_FILES["tensorboard"]))
    acc.Reload()
    history = json.loads((tmp_path / "run" / RUN_FILES["history"]).read_text())
    got = [(e.step, e.value) for e in acc.Scalars("val_pgd")]
    assert got == [(r["epoch"], pytest.approx(r["val_pgd"])) for r in history]
    # train.tensorboard does not shape the run: switching it off on --resume is accepted
    assert _train(capsys, tmp_path / "run", resume=True)[0] == 0


def test_tensorboard_missing_is_exit_2_naming_the_extra_before_anything_is_written(capsys, tmp_path, monkeypatch):
    import rb_labelrefine._optional as opt

    real = opt.importlib.import_module

    def no_tensorboard(name, *a, **k):
        if name.split(".")[0] == "tensorboard":
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(opt.importlib, "import_module", no_tensorboard)
    rc, _, err = _train(capsys, tmp_path / "run", "train.tensorboard=true")
    assert rc == 2 and "[tensorboard]" in err and "train.tensorboard" in err, err
    assert not (tmp_path / "run").exists()


class _StubWandb:
    """What the trainer uses of ``wandb`` (init / log / summary / finish), recorded; no network."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        stub = self

        class Run:
            summary = {}

            def log(self, values, step):
                stub.calls.append(("log", step, values))

            def finish(self):
                stub.calls.append(("finish", dict(self.summary)))
        return Run()


def test_wandb_logs_the_history_scalars_and_resumes_the_same_run(capsys, tmp_path, monkeypatch, stop_after_steps):
    import sys

    stub = _StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    sets = ["train.wandb={project: rbl, mode: offline}"]
    _interrupted_then_resumed(capsys, stop_after_steps, tmp_path / "run", sets, stops=(9,))
    inits = [c[1] for c in stub.calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "rbl" and inits[0]["config"]["train"]["epochs"] == 2
    history = json.loads((tmp_path / "run" / RUN_FILES["history"]).read_text())
    logged = {c[1]: c[2] for c in stub.calls if c[0] == "log"}
    assert sorted(logged) == [1, 2] and logged[2]["val_pgd"] == history[1]["val_pgd"]
    assert stub.calls[-1][0] == "finish" and stub.calls[-1][1]["best_epoch"] in (1, 2)
    # bad settings are refused naming the field
    rc, _, err = _train(capsys, tmp_path / "bad", "train.wandb={projekt: x}")
    assert rc == 2 and "train.wandb" in err and "projekt" in err


# ----------------------------------------------------------------------------- model.init_from

def test_init_from_a_run_starts_from_its_best_weights_and_resumes_without_the_source(capsys, tmp_path, src_run,
                                                                                     stop_after_steps):
    src = src_run
    from rb_labelrefine.runs import info_from_metadata
    from rb_labelrefine.training.build import initial_model

    best, meta = read_weights(src / RUN_FILES["best"])
    cfg = load_config("digits-pgdat", TINY + [f"model.init_from={src}"])
    model = initial_model(cfg, info_from_metadata(meta))
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, best[k]) for k, v in initial_model(cfg, info_from_metadata(meta), init=False)
                   .state_dict().items())
    # from the CLI, with a SIGTERM mid-epoch: the resumed run reads its checkpoint, not the source
    sets = [f"model.init_from={tmp_path / 'copy'}"]
    shutil.copytree(src, tmp_path / "copy")
    _train(capsys, tmp_path / "ref", *sets)
    stop_after_steps([4])
    assert _train(capsys, tmp_path / "run", *sets)[0] == 3
    shutil.rmtree(tmp_path / "copy")
    rc, _, err = _train(capsys, tmp_path / "run", *sets, resume=True)
    assert rc == 0, err
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
    summary = json.loads((tmp_path / "run" / RUN_FILES["summary"]).read_text())
    assert summary["init_from"] == str(tmp_path / "copy")
    # a .safetensors file (the final weights) works too
    rc, _, err = _train(capsys, tmp_path / "f", f"model.init_from={src / RUN_FILES['final']}", "train.epochs=1")
    assert rc == 0, err


def test_init_from_timm_pretrained_asks_timm_for_its_pretrained_weights(monkeypatch):
    timm = need("timm")
    from rb_labelrefine.runs import info_from_metadata
    from rb_labelrefine.training.build import initial_model

    asked, real = [], timm.create_model

    def create_model(name, **kw):   # no network here: record the request, build without downloading
        asked.append(kw.pop("pretrained"))
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create_model)
    cfg = load_config("digits-pgdat", TINY + ["model.arch=timm:resnet10t", "model.init_from=timm:pretrained"])
    info = info_from_metadata({"data_info": json.dumps({"name": "digits", "num_classes": 10, "channels": 1,
                                                         "image_size": 8, "mean": [0.5], "std": [0.5]})})
    initial_model(cfg, info)
    initial_model(cfg, info, init=False)   # a resumed run: its weights come from the checkpoint
    assert asked == [True, False]


@pytest.mark.parametrize("sets, says", [
    (["model.arch=tiny_cnn"], "holds a mlp model; this run's model.arch is tiny_cnn"),
    (["model.kwargs={hidden: 32}"], "model.1.weight is (64, 64), mlp has (32, 64)"),  # the tensor is named
    (["model.init_from=timm:pretrained"], "needs a timm model"),
    (["model.init_from=SRC/checkpoint.pt"], "give a run directory, a .safetensors"),
    (["model.init_from=SRC/nothing.safetensors"], "weights not found"),
])
def test_init_from_mismatch_is_exit_2_naming_the_field(capsys, tmp_path, src_run, sets, says):
    src = src_run
    sets = [s.replace("SRC", str(src)) for s in sets]
    if not any(s.startswith("model.init_from") for s in sets):
        sets.append(f"model.init_from={src}")
    rc, _, err = _train(capsys, tmp_path / "run", *sets)
    assert rc == 2 and "model.init_from" in err and says in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- train.accum_steps

def _one_step(accum: int, extra=(), preset="digits-pgdat") -> dict:
    cfg = load_config(preset, TINY + [f"train.accum_steps={accum}", "attack.random_start=false",
                                              "data.batch_size=24", *extra])
    t = Trainer(cfg, "/nonexistent-h7", progress=False)
    t._setup()
    t.global_step = 0
    x, y, idx = next(iter(t.stream.epoch(0, 0)))
    loss, logits = t.train_step(x, y, idx, 0)
    state = {**t.model.state_dict(), **{f"rectifier.{k}": v for k, v in t.rectifier.state_dict().items()}}
    return {"loss": float(loss.detach()), "logits": logits.detach(),
            **{k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}}


@pytest.mark.parametrize("k, preset", [(2, "digits-pgdat"), (3, "digits-pgdat"), (4, "digits-pgdat"),
                                       (4, "digits-trades-adr"), (4, "digits-ls"), (4, "digits-ltd"),
                                       (4, "digits-kd-swa")])
def test_accumulated_step_equals_the_full_batch_step(k, preset, teacher_pt):
    """mlp (no BatchNorm): k micro-batches of 24/k, the loss scaled by their share, give the
    full batch's mean gradient: one step moves the weights (and ADR's teacher, with TRADES) as the
    full-batch step does (~1e-6); the same with KD's and LTD's frozen teachers."""
    t = teacher_pt["mlp"]
    extra = {"digits-ltd": [f"method.teacher={t}"],
             "digits-kd-swa": [f"method.robust_teacher={t}", f"method.standard_teacher={t}"]}.get(preset, [])
    full, acc = _one_step(1, extra, preset=preset), _one_step(k, extra, preset=preset)
    assert acc["loss"] == pytest.approx(full["loss"], rel=1e-6)
    for key, v in full.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(acc[key], v, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("preset", ["digits-pgdat", "digits-trades-adr"])
def test_accumulation_from_the_cli_resumes_bit_exact(capsys, tmp_path, stop_after_steps, preset):
    """Plain PGD-AT, and ADR's EMA teacher with TRADES."""
    sets = ["train.accum_steps=4"]
    rc, _, err = _train(capsys, tmp_path / "ref", *sets, preset=preset)
    assert rc == 0, err
    stop_after_steps([4])
    assert _train(capsys, tmp_path / "run", *sets, preset=preset)[0] == 3
    rc, _, err = _train(capsys, tmp_path / "run", *sets, preset=preset, resume=True)
    assert rc == 0, err
    _assert_same_run(tmp_path / "run", tmp_path / "ref")


def test_accumulation_under_torchrun_is_refused_naming_the_field():
    from types import SimpleNamespace

    from rb_labelrefine.training.step import StepRuntime

    cfg = load_config("digits-pgdat", TINY + ["train.accum_steps=2"])
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="train.accum_steps.*torchrun"):
        StepRuntime(cfg.train, torch.device("cpu"), model, None, dist=SimpleNamespace(enabled=True))


@pytest.mark.parametrize("sets, says", [
    (["train.accum_steps=4", "awp.enabled=true"], "awp.enabled"),
    (["train.accum_steps=5"], "not a multiple"),
    (["train.accum_steps=64"], "data.batch_size"),
    (["train.accum_steps=4", "PRESET=digits-sglr"], "method.name=sglr"),   # its memory rows: one target per step
])
def test_accumulation_refuses_what_it_does_not_support(capsys, tmp_path, sets, says):
    preset = next((s.split("=")[1] for s in sets if s.startswith("PRESET=")), "digits-pgdat")
    sets = [s for s in sets if not s.startswith("PRESET=")]
    rc, _, err = _train(capsys, tmp_path / "run", *sets, preset=preset)
    assert rc == 2 and "train.accum_steps" in err and says in err, err
    with pytest.raises(ConfigError, match="train.accum_steps"):
        load_config(preset, TINY + sets)


# ----------------------------------------------------------------------------- extending a finished run

@pytest.mark.parametrize("preset, extra, says", [
    ("digits-pgdat", [], "the lr decays from epochs [2, 3] -> [3, 4]"),
    # ADR's own EMA teacher and schedules over all steps, WA, SWA (its start is kept)
    ("digits-trades-adr", ["swa.enabled=true", "swa.start_epoch=1", "wa.enabled=true"],
     "ADR's temperature and interpolation schedules stretch"),
])
def test_extending_a_finished_run_continues_it_and_resumes_bit_exact(capsys, tmp_path, stop_after_steps, preset,
                                                                      extra, says):
    for name in ("ref", "run"):
        assert _train(capsys, tmp_path / name, *extra, preset=preset)[0] == 0
    first_final = (tmp_path / "run" / RUN_FILES["final"]).read_bytes()
    first_summary = (tmp_path / "run" / RUN_FILES["summary"]).read_text()
    more = [*extra, "train.epochs=4"]
    rc, _, err = _train(capsys, tmp_path / "ref", *more, resume=True, preset=preset)
    assert rc == 0, err
    assert "extending the finished 2-epoch run to 4 epochs" in err and says in err, err
    # the same extension, stopped twice (mid-epoch 3 and mid-epoch 4) and resumed
    stop_after_steps([14, 21])
    rc, _, err = _train(capsys, tmp_path / "run", *more, resume=True, preset=preset)
    assert rc == 3, err
    for expect in (3, 0):
        rc, _, err = _train(capsys, tmp_path / "run", *more, resume=True, preset=preset)
        assert rc == expect, err
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
    run = tmp_path / "run"
    assert len(json.loads((run / RUN_FILES["history"]).read_text())) == 4
    assert load_config(str(run / RUN_FILES["config"])).train.epochs == 4
    # nothing of the 2-epoch run is lost
    assert (run / "final_epochs2.safetensors").read_bytes() == first_final
    assert (run / "summary_epochs2.json").read_text() == first_summary
    # eval reads the extended run (its files carry the new fingerprint)
    rc, _, err = _train(capsys, run, *more, resume=True, preset=preset)
    assert rc == 0 and "nothing changed" in err
    from rb_labelrefine.runs import load_run_model

    load_run_model(run, "best")
    load_run_model(run, "final")


def test_only_a_finished_run_is_extended_and_only_by_epochs(capsys, tmp_path, stop_after_steps):
    stop_after_steps([4])
    assert _train(capsys, tmp_path / "run")[0] == 3
    before = _hash_tree(tmp_path / "run")
    rc, _, err = _train(capsys, tmp_path / "run", "train.epochs=4", resume=True)
    assert rc == 2 and "only a finished run is extended" in err and "--resume" in err, err
    assert _hash_tree(tmp_path / "run") == before
    assert _train(capsys, tmp_path / "run", resume=True)[0] == 0
    before = _hash_tree(tmp_path / "run")
    rc, _, err = _train(capsys, tmp_path / "run", "train.epochs=4", "attack.steps=3", resume=True)
    assert rc == 2 and "different config" in err
    rc, _, err = _train(capsys, tmp_path / "run", "train.epochs=1", resume=True)
    assert rc == 2 and "different config" in err
    assert _hash_tree(tmp_path / "run") == before
