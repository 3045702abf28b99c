"""A run's random state does not depend on what else is installed or imported (issue 26).

``import rich`` (pulled in by ``sklearn.datasets`` when rich is installed) draws from Python's
global ``random``; any package may do the same, or draw from numpy's global generator, at import
time.  Such an import happening after the run was seeded -- lazily, in one process and not in the
other -- must change nothing: not the checkpoint, not the weights, not what a user's own transform
draws from ``random``/``np.random``.  The real-process version (``python -m`` with an import-time
consumer injected through ``sitecustomize``) is in test_reliability.py.
"""
from __future__ import annotations

import json
import random
import signal
import sys
import uuid

import numpy as np
import pytest
import torch

from _compare import same_state
from rb_labelrefine.config import load_config
from rb_labelrefine.data import load_synthetic
from rb_labelrefine.data.datasets import IndexedDataset, TensorImageDataset
from rb_labelrefine.runs import RUN_FILES, read_weights
from rb_labelrefine.training import rng
from rb_labelrefine.training.io import safe_torch_load
from rb_labelrefine.training.trainer import Trainer, TrainingInterrupted

TINY = ["model.arch=mlp", "data.name=synthetic", "data.batch_size=32", "attack.steps=1", "train.epochs=2",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "eval.val_attack_steps=1",
        "eval.test_attack_steps=1", "eval.curve_test_size=32"]


def _user_transform(x):
    """A user's augmentation that draws from both global generators (in the main process)."""
    return (x + 0.05 * random.gauss(0.0, 1.0) + 0.05 * float(np.random.standard_normal())).clamp(0, 1)


class _ImportsOnFirstLen(IndexedDataset):
    """Imports a brand-new module the first time its length is asked (the trainer does, after
    seeding): that module draws from ``random`` and numpy's generator at import, as rich does."""

    def __init__(self, dataset, tmp_path):
        super().__init__(dataset)
        self._tmp, self._done = tmp_path, False

    def __len__(self):
        if not self._done:
            self._done = True
            name = f"_rng_consumer_{uuid.uuid4().hex}"
            (self._tmp / f"{name}.py").write_text("import random, numpy\nrandom.random()\nnumpy.random.random(3)\n")
            sys.path.insert(0, str(self._tmp))
            try:
                __import__(name)
            finally:
                sys.path.remove(str(self._tmp))
        return super().__len__()


def _datasets(tmp_path=None):
    tr, te, info = load_synthetic(n_train=160, n_test=48, num_classes=4, channels=1, image_size=8)
    train = TensorImageDataset(tr.x[32:], tr.y[32:], transform=_user_transform)
    wrap = (lambda d: _ImportsOnFirstLen(d, tmp_path)) if tmp_path is not None else IndexedDataset
    return (wrap(train), IndexedDataset(TensorImageDataset(tr.x[:32], tr.y[:32])),
            IndexedDataset(TensorImageDataset(te.x, te.y)), info)


def test_a_late_import_that_draws_changes_no_resumed_run(tmp_path, monkeypatch):
    cfg = load_config("digits-pgdat", TINY)
    ref_dir = tmp_path / "ref"
    (tmp_path / "mods").mkdir()
    Trainer(cfg, ref_dir, progress=False, datasets=_datasets(tmp_path / "mods")).fit()

    # the same run, interrupted mid-epoch 1 and resumed, in a process whose imports are all done
    orig = Trainer.train_step
    calls = {"n": 0}

    def train_step(self, *a, **k):
        out = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            os_kill_self()
        return out

    def os_kill_self():
        import os
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, run, progress=False, datasets=_datasets()).fit()
    assert int(safe_torch_load(run / RUN_FILES["checkpoint"])["batch"]) == 2
    random.random(), np.random.random(5)   # whatever happens between the two processes
    Trainer(cfg, run, resume=True, progress=False, datasets=_datasets()).fit()

    for which in ("final", "best"):
        a, b = read_weights(run / RUN_FILES[which])[0], read_weights(ref_dir / RUN_FILES[which])[0]
        same_state(a, b, which)
    drop = lambda h: [{k: v for k, v in r.items() if k != "train_time_s"} for r in h]  # noqa: E731
    assert drop(json.loads((run / RUN_FILES["history"]).read_text())) == \
        drop(json.loads((ref_dir / RUN_FILES["history"]).read_text()))
    a, b = safe_torch_load(run / RUN_FILES["checkpoint"]), safe_torch_load(ref_dir / RUN_FILES["checkpoint"])
    same_state(a["rng"], b["rng"], "rng")


def test_the_global_generators_are_a_function_of_the_position_only():
    rng.reseed_globals(3, 1, 7, 0)
    a = (random.random(), float(np.random.random()))
    random.random(), np.random.random(11)            # an import in between
    rng.reseed_globals(3, 1, 7, 0)
    assert (random.random(), float(np.random.random())) == a
    for other in [(4, 1, 7, 0), (3, 2, 7, 0), (3, 1, 8, 0), (3, 1, 7, 1)]:
        rng.reseed_globals(*other)
        assert (random.random(), float(np.random.random())) != a, other


def test_the_checkpoint_holds_torch_state_only_and_an_old_checkpoints_extra_entries_load():
    torch.manual_seed(5)
    state = rng.state_dict()
    assert set(state) == {"torch", "cuda"}
    expected = torch.rand(3)
    torch.manual_seed(6)
    rng.load_state_dict({**state, "python": [3, [0] * 625, None], "numpy": ["MT19937", torch.zeros(624), 0, 0, 0.0]})
    assert torch.equal(torch.rand(3), expected)
