"""Specification: selection keeps one object per criterion -- the best checkpoint and, beside a best
selected by another attack, the one cross-entropy PGD would pick -- each with its own state (the
checkpoint's ``best`` / ``best_pgd_ce`` entries, layout unchanged: checkpoints written before the
split, and before ``score`` / ``best_pgd_ce`` existed, still resume).  The summary's
``effective_decays`` are WA's and those the rectifier declares, never found by attribute names."""
from __future__ import annotations

import pytest
import torch.nn as nn

from rb_labelrefine.averaging import EMA
from rb_labelrefine.config import load_config
from rb_labelrefine.rectifiers.adr import ADR
from rb_labelrefine.rectifiers.base import Rectifier
from rb_labelrefine.training.finish import effective_decays
from rb_labelrefine.training.selection import Best, BestByCE, Selector


def _selector(*overrides):
    saved = []
    cfg = load_config("digits-pgdat", list(overrides))
    sel = Selector(cfg, has_val=True, save=lambda model, which, epoch, eval_model: saved.append((which, epoch)))
    return sel, saved


def _rec(epoch, val_pgd, margin=None):
    rec = {"epoch": epoch + 1, "val_pgd": val_pgd, "val_clean": 80.0, "test_pgd": 40.0}
    if margin is not None:
        rec["val_pgd_margin"] = margin
    return rec


def test_each_criterion_selects_and_keeps_its_own_state():
    sel, saved = _selector("eval.val_attack=pgd_margin")
    assert isinstance(sel.best, Best) and isinstance(sel.best_pgd_ce, BestByCE) and sel.best_pgd_ce.active
    for epoch, (ce, margin) in enumerate([(50.0, 40.0), (55.0, 38.0), (52.0, 45.0)]):
        sel.end_epoch(epoch, _rec(epoch, ce, margin), nn.Identity(), "raw")
    assert saved == [("best", 1), ("best_pgd_ce", 1), ("best_pgd_ce", 2), ("best", 3)]
    assert (sel.best.epoch, sel.best_pgd_ce.epoch) == (3, 2)
    state = sel.state_dict()
    assert set(state) == {"best", "best_pgd_ce"}               # the checkpoint's keys, as before the split
    assert state["best"] == sel.best.state_dict() and state["best_pgd_ce"] == sel.best_pgd_ce.state_dict()
    assert state["best"]["score"] == 45.0 and state["best"]["val_attack"] == "pgd_margin"
    assert state["best_pgd_ce"]["score"] == 55.0

    other, _ = _selector("eval.val_attack=pgd_margin")
    other.best_pgd_ce.load_state_dict(state["best_pgd_ce"], 3)  # one criterion restored leaves the other alone
    assert other.best_pgd_ce.state_dict() == state["best_pgd_ce"] and other.best.epoch == -1
    other.load_state_dict(state, 3)
    assert other.state_dict() == state and other.summary() == sel.summary()
    assert sel.summary()["best_pgd_ce_epoch"] == 2 and sel.summary()["best"]["selected_on"] == "val"


def test_a_best_selected_by_cross_entropy_pgd_keeps_no_second_criterion():
    sel, saved = _selector()
    for epoch, ce in enumerate([50.0, 55.0]):
        sel.end_epoch(epoch, _rec(epoch, ce), nn.Identity(), "raw")
    assert saved == [("best", 1), ("best", 2)] and not sel.best_pgd_ce.active
    assert sel.state_dict()["best_pgd_ce"] == {"epoch": -1, "score": -1.0}
    assert "best_pgd_ce" not in sel.summary() and sel.summary()["best_epoch"] == 2


def test_a_best_entry_written_before_score_existed_resumes_and_competes_by_its_val_pgd():
    sel, saved = _selector()
    old = {"best": {"epoch": 3, "val_pgd": 50.0, "val_clean": 70.0}}    # no "score", no "best_pgd_ce"
    sel.load_state_dict(old, 3)
    assert sel.best.score == 50.0 and sel.best_pgd_ce.epoch == -1
    sel.end_epoch(3, _rec(3, 45.0), nn.Identity(), "raw")
    assert saved == [] and sel.best.epoch == 3                          # 45 < the old entry's 50
    assert sel.summary()["best"] == {"selected_on": "val", "val_pgd": 50.0, "val_clean": 70.0}
    sel.end_epoch(4, _rec(4, 51.0), nn.Identity(), "raw")
    assert saved == [("best", 5)] and sel.best.score == 51.0


@pytest.mark.parametrize("entry", ["best", "best_pgd_ce"])
def test_a_selected_epoch_after_the_epochs_done_does_not_fit_for_every_criterion(entry):
    sel, _ = _selector("eval.val_attack=pgd_margin")
    state = {"best": {"epoch": 2, "score": 50.0}, "best_pgd_ce": {"epoch": 1, "score": 40.0}}
    state[entry] = {"epoch": 5, "score": 60.0}
    with pytest.raises(ValueError, match=f"{entry} epoch 5 after 3 epochs"):
        sel.load_state_dict(state, 3)


# ----------------------------------------------------------------------------- effective decays

class _ListTeacher(Rectifier):
    """A rectifier keeping its EMA teacher in a list, declaring its decay."""

    def __init__(self, model):
        super().__init__(10)
        self.teachers = [EMA(model, decay=0.9)]

    def modules(self):
        return [t for t in self.teachers]

    def effective_decays(self):
        return {"list_teacher": self.teachers[0].decay}


class _Undeclared(Rectifier):
    """A rectifier with an attribute that happens to be called ``teacher``: nothing is declared."""

    def __init__(self, model):
        super().__init__(10)
        self.teacher = EMA(model, decay=0.8)


def test_the_decays_reported_are_wa_s_and_those_the_rectifier_declares():
    model = nn.Linear(4, 10)
    wa = EMA(model, decay=0.99)
    adr = ADR(model, 10, total_steps=100, ema_decay=0.95)
    assert effective_decays(None, adr) == {"adr_teacher": 0.95}
    assert effective_decays(wa, ADR(model, 10, total_steps=100, ema_decay=0.99, teacher=wa)) == \
        {"wa": 0.99, "adr_teacher": 0.99}                                 # ADR sharing the WA EMA as its teacher
    assert effective_decays(wa, _ListTeacher(model)) == {"wa": 0.99, "list_teacher": 0.9}
    assert effective_decays(None, _Undeclared(model)) == {}             # no attribute reflection
    assert effective_decays(wa, Rectifier(10)) == {"wa": 0.99}
