"""The trainer's parts, each held to its own job: where the best checkpoint is selected
(``eval.select_on``), the rectifier's modules (declared, not found by reflection), the one owner of
the stop state, and the errors that carry their exit codes."""
import json
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from rb_labelrefine import errors
from rb_labelrefine.config import ConfigError, TrainConfig, config_to_dict, load_config
from rb_labelrefine.rectifiers.base import Rectifier, Target
from rb_labelrefine.training import trainer as trainer_module
from rb_labelrefine.training.signals import StopSignal
from rb_labelrefine.training.step import StepRuntime
from rb_labelrefine.training.trainer import Trainer

TINY = ["data.name=synthetic", "data.batch_size=32", "data.val_fraction=0.125", "model.arch=mlp",
        "attack.eps=0.1", "attack.alpha=0.05", "attack.steps=2", "train.epochs=3", "train.threads=1",
        "eval.curve_test_size=32", "eval.val_attack_steps=2", "eval.test_attack_steps=2",
        "train.reference_steps_per_epoch=null"]


def _first_argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i)) + 1


# ----------------------------------------------------------------------------- eval.select_on

def test_a_run_without_a_validation_split_is_refused_naming_both_fields_and_writes_nothing(tmp_path):
    from rb_labelrefine.cli import main

    cfg = load_config("digits-pgdat", TINY + ["data.val_fraction=0"])
    with pytest.raises(ConfigError) as exc:
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert exc.value.field == "eval.select_on" and "data.val_fraction" in str(exc.value)
    assert not (tmp_path / "run").exists()
    argv = ["train", "--config", "digits-pgdat", "--out", str(tmp_path / "cli"), "--quiet"]
    for s in TINY + ["data.val_fraction=0"]:
        argv += ["--set", s]
    assert main(argv) == 2 and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_best_checkpoint_is_selected_on_the_chosen_split_and_the_summary_and_card_say_which(tmp_path, split):
    pytest.importorskip("jinja2")
    from rb_labelrefine.export.model_card import card_context, render_model_card

    sets = TINY + (["data.val_fraction=0", "eval.select_on=test"] if split == "test" else [])
    cfg = load_config("digits-pgdat", sets)
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert summary["best"]["selected_on"] == split
    assert summary["best_epoch"] == _first_argmax([r[f"{split}_pgd"] for r in history])
    if split == "test":
        assert all("val_pgd" not in r for r in history)          # nothing was validated
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best"]["selected_on"] == split
    card = render_model_card(card_context(name="m", cfg=config_to_dict(cfg), dataset="synthetic",
                                          threat_model="Linf", eps=0.1, summary=summary))
    said = "on the **test** split" in card
    assert said == (split == "test") and ("held-out validation split" in card) == (split == "val")


def test_select_on_takes_val_or_test_and_test_selects_with_the_curve_attack():
    with pytest.raises(ConfigError, match="eval.select_on"):
        load_config("digits-pgdat", ["eval.select_on=train"])
    with pytest.raises(ConfigError, match="eval.val_attack"):
        load_config("digits-pgdat", ["eval.select_on=test", "eval.val_attack=pgd_margin"])


def test_a_card_of_a_summary_written_before_selected_on_existed_tells_the_truth():
    from rb_labelrefine.export.model_card import _selected_on

    assert _selected_on({"epoch": 3, "val_pgd": None, "val_clean": None, "test_pgd": 40.0}) == "test"
    assert _selected_on({"epoch": 3, "val_pgd": 41.0, "test_pgd": 40.0}) == "val"


# ----------------------------------------------------------------------------- rectifier modules

class ListTeacher(Rectifier):
    """A custom rectifier that keeps its (frozen) teacher in a list, not in an attribute."""
    name = "list_teacher"

    def __init__(self, teacher: nn.Module, num_classes: int):
        super().__init__(num_classes)
        self.teachers = [teacher.eval()]

    def targets(self, x, y, *, index=None):
        return Target(y)

    def modules(self):
        return list(self.teachers)


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_a_rectifier_keeping_its_teacher_in_a_list_gets_channels_last_with_the_student(tmp_path, monkeypatch):
    teacher = _tiny_cnn()
    built = []

    def build(cfg, model, **kw):
        built.append(ListTeacher(teacher, kw["num_classes"]))
        return built[-1]
    monkeypatch.setattr(trainer_module, "build_rectifier_for", build)
    cfg = load_config("digits-pgdat", TINY + ["model.arch=tiny_cnn", "train.channels_last=true"])
    t = Trainer(cfg, tmp_path / "run", progress=False, handle_signals=False)
    t._setup()
    assert t.rectifier is built[0]
    conv = teacher[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)


def test_under_ddp_a_teacher_in_a_list_is_broadcast_from_rank_0():
    class Group:  # the process group's side, as StepRuntime uses it
        enabled, is_main, backend = True, True, "gloo"

        def broadcast_modules(self, mods):
            self.broadcast = list(mods)

        def wrap(self, model):
            return model

        def any_true(self, flag):
            return flag

    student, teacher, group = _tiny_cnn(), _tiny_cnn(), Group()
    rect = ListTeacher(teacher, 10)
    StepRuntime(TrainConfig(), torch.device("cpu"), student, None, modules=rect.modules(), dist=group,
                global_batch=lambda step: 8)
    assert any(m is student for m in group.broadcast) and any(m is teacher for m in group.broadcast)


def test_the_builtin_rectifiers_declare_their_teachers(tmp_path):
    from rb_labelrefine.averaging import EMA
    from rb_labelrefine.rectifiers import ADR, LTD, KDSelfTeachers

    model = _tiny_cnn()
    adr = ADR(model, 10, total_steps=4)
    assert len(adr.modules()) == 1 and isinstance(adr.modules()[0], EMA)
    robust, standard = _tiny_cnn(), _tiny_cnn()
    assert KDSelfTeachers(10, robust_teacher=robust, standard_teacher=standard).modules() == [robust, standard]
    assert LTD(robust, 10).modules() == [robust]
    assert Rectifier(10).modules() == []


# ----------------------------------------------------------------------------- the stop state

def test_a_signal_applies_at_the_next_safe_point_and_a_second_one_stops_at_once():
    lines = []
    stop = StopSignal(lines.append)
    assert not stop.requested
    stop.handle(signal.SIGTERM)
    assert stop.requested and stop.name == "SIGTERM" and "finishing the current step" in lines[-1]
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT)


def test_under_torchrun_a_signal_applies_on_every_rank_once_they_agree():
    noted = StopSignal(lambda msg: None)
    with noted.installed(enabled=False, distributed=True):
        noted.handle(signal.SIGINT)
        assert not noted.requested                     # pending: the ranks have not agreed yet
        assert noted.agree(lambda flag: flag) and noted.requested and noted.name == "SIGINT"
    other = StopSignal(lambda msg: None)                # a rank that received nothing
    with other.installed(enabled=False, distributed=True):
        assert not other.agree(lambda flag: False) and not other.requested
        assert other.agree(lambda flag: True) and other.name == "SIGTERM"
    late = StopSignal(lambda msg: None)
    with late.installed(enabled=False, distributed=True):
        late.handle(signal.SIGTERM)                     # after the last agreement
        late.finish()
        assert late.requested


def test_the_handler_is_installed_for_the_run_only():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal(lambda msg: None)
    with stop.installed():
        assert signal.getsignal(signal.SIGTERM) == stop.handle
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- errors

def test_every_error_carries_its_exit_code_and_an_internal_value_error_is_a_bug():
    from rb_labelrefine.cli import _classify

    cases = [(errors.ConfigError("a.b", "bad"), 2), (errors.UsageError("--n"), 2), (errors.ResumeError("x"), 2),
             (errors.RunLockedError("x"), 2), (errors.UnsafeCheckpointError("x"), 2),
             (errors.CorruptDatasetError("f", "x"), 2), (errors.DatasetNotFoundError("d", ["p"]), 2),
             (errors.UnsafePickleError("f", "x"), 2), (errors.ExportError("x"), 2), (errors.MissingExtraError("x"), 2),
             (errors.NonFiniteLossError("x"), 1), (errors.TrainingInterrupted("x"), 3),
             (errors.StorageError("/p", OSError(28, "No space left on device")), 4),
             (ValueError("an internal bug"), 70), (RuntimeError("x"), 70), (KeyboardInterrupt(), 130)]
    for exc, code in cases:
        assert _classify(exc)[0] == code, exc


def test_the_error_types_are_the_ones_the_modules_raise():
    from rb_labelrefine import _optional, config
    from rb_labelrefine.data import errors as data_errors
    from rb_labelrefine.training import errors as training_errors
    from rb_labelrefine.training import io

    assert config.ConfigError is errors.ConfigError and _optional.MissingExtraError is errors.MissingExtraError
    assert data_errors.CorruptDatasetError is errors.CorruptDatasetError
    assert training_errors.ResumeError is errors.ResumeError and io.StorageError is errors.StorageError


@pytest.mark.parametrize("module, absent", [("rb_labelrefine.errors", "rb_labelrefine.config"),
                                            ("rb_labelrefine.rectifiers", "rb_labelrefine.config")])
def test_errors_is_a_leaf_and_the_rectifiers_do_not_import_the_config(module, absent):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('rb_labelrefine')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert absent not in loaded
    if module == "rb_labelrefine.errors":
        assert eval(loaded) == ["rb_labelrefine", "rb_labelrefine.errors"]
