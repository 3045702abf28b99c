"""Run fingerprints across package versions (rb_labelrefine/runs.py: check_fingerprint).

A file written before a config field existed is accepted when that field is now at its default
(of a freshly built config for the same method) -- and only then: a changed value, a stored
field that no longer exists, or a new field at another value is still refused, naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
import yaml
from safetensors.torch import save

from rb_labelrefine import cli
from rb_labelrefine.config import load_config
from rb_labelrefine.runs import (RUN_FILES, _fingerprinted_fields, check_fingerprint, check_run_weights,
                                 fingerprint_metadata, load_run_model, read_weights)
from rb_labelrefine.training.io import safe_torch_load
from rb_labelrefine.training.trainer import ResumeError, Trainer, TrainingInterrupted

TINY = ["model.arch=mlp", "data.train_subset=96", "data.batch_size=32", "attack.steps=1", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=1", "eval.curve_test_size=32"]


def _older(cfg, drop=(), change=None) -> dict:
    """The fingerprint metadata an older rb_labelrefine would have written for ``cfg``: without
    the fields ``drop`` (they did not exist yet), with ``change`` applied, the fingerprint computed
    over that very text (as fingerprint_metadata does)."""
    fields = {k: v for k, v in _fingerprinted_fields(cfg).items() if k not in drop}
    fields.update(change or {})
    text = json.dumps(fields, sort_keys=True, default=str)
    return {"config_fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "run_config": text,
            "rb_labelrefine": "0.0.old"}


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def test_the_same_config_passes_with_nothing_added():
    cfg = load_config("digits-adr", TINY)
    assert check_fingerprint(cfg, fingerprint_metadata(cfg), "f") == []


def test_a_field_added_later_at_its_default_is_accepted_and_named():
    cfg = load_config("digits-adr", TINY)
    assert cfg.method.auto_share == 0.02 and cfg.method.auto_every is None  # the ADR defaults
    assert check_fingerprint(cfg, _older(cfg, drop=["method.auto_share"]), "f") == ["method.auto_share"]
    both = ["method.auto_every", "method.auto_share"]
    assert check_fingerprint(cfg, _older(cfg, drop=both), "f") == both
    assert check_run_weights("run", cfg, _older(cfg, drop=both), "best") == both
    lines = []
    check_run_weights("run", cfg, _older(cfg, drop=both), "best", log=lines.append)
    assert len(lines) == 1 and "method.auto_every, method.auto_share" in lines[0] and "best.safetensors" in lines[0]


def test_a_field_added_later_at_another_value_is_refused_naming_it():
    cfg = load_config("digits-adr", TINY + ["method.auto_share=0.05"])
    with pytest.raises(ValueError, match=r"belongs to another run \(method\.auto_share: None in the file, 0\.05"):
        check_fingerprint(cfg, _older(cfg, drop=["method.auto_share"]), "f")
    every = load_config("digits-adr", TINY + ["method.schedule=auto", "method.auto_every=5"])
    with pytest.raises(ValueError, match=r"method\.auto_every: None in the file, 5 in config\.yaml"):
        check_fingerprint(every, _older(every, drop=["method.auto_every"]), "f")


def test_a_changed_value_is_refused_even_beside_a_field_added_later():
    cfg = load_config("digits-adr", TINY)
    with pytest.raises(ValueError, match=r"train\.seed: 1 in the file, 0 in config\.yaml") as exc:
        check_fingerprint(cfg, _older(cfg, drop=["method.auto_share"], change={"train.seed": 1}), "f")
    assert "auto_share" not in str(exc.value)  # only the real difference is named


def test_a_stored_field_that_no_longer_exists_is_refused_naming_it():
    cfg = load_config("digits-adr", TINY)
    with pytest.raises(ValueError, match=r"method\.old_knob: 3 in the file, None in config\.yaml"):
        check_fingerprint(cfg, _older(cfg, change={"method.old_knob": 3}), "f")


def test_a_run_config_edited_after_its_fingerprint_proves_nothing():
    cfg = load_config("digits-adr", TINY)
    stored = _older(cfg, change={"train.seed": 1})  # another run's fingerprint ...
    stored["run_config"] = _older(cfg, drop=["method.auto_share"])["run_config"]  # ... a harmless-looking config
    with pytest.raises(ValueError, match="belongs to another run"):
        check_fingerprint(cfg, stored, "f")


def test_fields_of_a_method_the_file_did_not_use_are_not_added_later():
    # a PGD-AT (onehot) file holds none of ADR's settings; at their defaults they still do not
    # make it an ADR run: the method differs, and only that is named
    cfg = load_config("digits-adr", TINY)
    adr_fields = [k for k in _fingerprinted_fields(cfg) if k.startswith("method.") and k != "method.name"]
    stored = _older(cfg, drop=adr_fields, change={"method.name": "onehot"})
    with pytest.raises(ValueError, match=r"another run \(method\.name: 'onehot' in the file, 'adr' in config\.yaml\)"):
        check_fingerprint(cfg, stored, "f")


def _as_older_version(run, drop):
    """Rewrite ``run``'s config.yaml, checkpoint and weights metadata as an rb_labelrefine without
    the method fields ``drop`` would have written them."""
    cfg = load_config(str(run / RUN_FILES["config"]))
    raw = yaml.safe_load((run / RUN_FILES["config"]).read_text())
    for k in drop:
        raw["method"].pop(k.split(".", 1)[1], None)
    (run / RUN_FILES["config"]).write_text(yaml.safe_dump(raw))
    old = _older(cfg, drop=drop)
    state = safe_torch_load(run / RUN_FILES["checkpoint"])
    state.update(config_fingerprint=old["config_fingerprint"], run_config=old["run_config"])
    torch.save(state, run / RUN_FILES["checkpoint"])
    for which in ("best", "final"):
        if (run / RUN_FILES[which]).exists():
            tensors, meta = read_weights(run / RUN_FILES[which])
            meta.update(old)
            (run / RUN_FILES[which]).write_bytes(save(tensors, metadata=meta))


def test_a_run_of_an_older_version_resumes_evaluates_and_exports(tmp_path, monkeypatch, capsys):
    from rb_labelrefine.export.robustbench_export import export_run

    cfg = load_config("digits-adr", TINY)
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    orig = Trainer.train_step

    def stop_after_the_first_epoch(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == self.steps_per_epoch + 1 and not self.resume:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(Trainer, "train_step", stop_after_the_first_epoch)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = tmp_path / "run"
    drop = ["method.auto_every", "method.auto_share"]
    _as_older_version(run, drop)
    other = load_config("digits-adr", TINY + ["method.auto_share=0.07"])  # a real difference
    with pytest.raises(ResumeError, match=r"method\.auto_share: 0\.02 -> 0\.07"):  # config.yaml's check
        Trainer(other, run, resume=True, progress=False).fit()
    bare = tmp_path / "bare"  # without config.yaml: the checkpoint's fingerprint still refuses it
    shutil.copytree(run, bare)
    (bare / RUN_FILES["config"]).unlink()
    with pytest.raises(ResumeError, match=r"method\.auto_share: None in the file, 0\.07 in config\.yaml"):
        Trainer(other, bare, resume=True, progress=False).fit()
    lines = []
    Trainer(cfg, run, resume=True, progress=False, log=lines.append).fit()
    notes = [ln for ln in lines if "written before method.auto_every, method.auto_share existed" in ln]
    assert any("checkpoint.pt" in ln for ln in notes) and any("best.safetensors" in ln for ln in notes), lines
    a, b = (safe_torch_load(tmp_path / d / RUN_FILES["checkpoint"]) for d in ("run", "ref"))
    for k, v in a["model"].items():  # nothing about the run differed: the same weights
        assert torch.equal(v, b["model"][k]), k

    _as_older_version(run, drop)  # the finished run, as an older version left it
    assert Trainer(cfg, run, resume=True, progress=False, log=lines.append).fit()["best"]
    seen = []
    model, _, _ = load_run_model(run, "final", log=seen.append)
    assert len(seen) == 1 and "final.safetensors" in seen[0]
    capsys.readouterr()
    rc = cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")])
    assert rc == 0 and "written before method.auto_every, method.auto_share existed" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["source"]["fields_added_later"] == drop
    export_run(run, tmp_path / "export2")  # no log: still fine
