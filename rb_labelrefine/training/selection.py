"""The end of an epoch's evaluation, and the choice of the best checkpoint.

Per epoch (:func:`epoch_record`): PGD-k on the held-out validation split (and, for
``eval.val_attack`` other than ``pgd_ce``, that attack too), clean and PGD-k accuracy on a fixed test
subset for the curve.  :class:`Selector` holds the selection criteria, each a
:class:`BestCheckpoint` with its own state: :class:`Best`, the papers' early-stopping protocol,
and beside it :class:`BestByCE`, the epoch cross-entropy PGD would pick (``best_pgd_ce``).

**Where the best checkpoint is selected** is a setting, never a fallback: ``eval.select_on: val`` (the
default) selects on the validation split, and a run without one (``data.val_fraction: 0``) is refused;
``eval.select_on: test`` selects on the test curve, as the ADR code does.  The choice is recorded as
``best.selected_on`` (summary.json, the model card).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..config import Config, ConfigError

__all__ = ["Selector", "BestCheckpoint", "Best", "BestByCE", "eval_loaders", "evaluated_model", "bn_loader",
           "epoch_record", "epoch_line", "evaluate"]


def eval_loaders(cfg: Config, val_ds, test_ds, num_classes: int) -> tuple:
    """``(val_loader or None, curve_loader)``: the validation split, and the fixed test subset of the
    curve (the first ``eval.curve_test_size`` points: the test split is pre-shuffled); batches checked."""
    from .stream import CheckedLoader

    bs = cfg.eval.batch_size
    val = CheckedLoader.over(val_ds, bs, num_classes, "validation") if len(val_ds) else None
    n = cfg.eval.curve_test_size
    if n is not None and n < len(test_ds):
        test_ds = torch.utils.data.Subset(test_ds, list(range(n)))
    return val, CheckedLoader.over(test_ds, bs, num_classes, "test")


def evaluated_model(cfg: Config, model: nn.Module, wa, swa, bn_loader: Callable, device) -> tuple:
    """``(module, which)``: the weights that are validated and exported (``eval.model``; auto: swa >
    ema > raw).  SWA's BatchNorm statistics are recomputed first when stale (``bn_loader()``)."""
    which = cfg.eval.model
    if which == "auto":
        which = "swa" if (swa is not None and swa.active) else ("ema" if wa is not None else "raw")
    if which == "swa" and swa is not None and swa.active:
        if swa.bn_stale and cfg.swa.bn_update:
            swa.update_bn(bn_loader(), device=device, form=cfg.swa.bn_form)
        return swa.module, "swa"
    if which == "ema" and wa is not None:
        return wa.module, "ema"
    return model, "raw"


def bn_loader(train_ds, batch_size: int, seed: int, epoch=None):
    """The BatchNorm recompute pass over the training split: in order (form equal), or (form code,
    ``epoch`` given) a fresh permutation of its own that depends only on (seed, epoch) -- the KD+SWA
    code walks its shuffled loader; the global RNG must not move (resume)."""
    from torch.utils.data import DataLoader

    from .stream import EpochSampler

    if epoch is None:
        return DataLoader(train_ds, batch_size=batch_size, shuffle=False)
    sampler = EpochSampler(len(train_ds), seed + 7919)
    sampler.set_epoch(epoch)
    return DataLoader(train_ds, batch_size=batch_size, sampler=sampler)


def evaluate(model: nn.Module, loader, attack_cfg, steps: int, device, loss: str = "ce",
             clean: bool = True) -> tuple:
    """``(clean accuracy or None, PGD-steps accuracy)`` of ``model`` (in eval mode) on ``loader``."""
    from ..evaluation.pgd import clean_accuracy, pgd_accuracy

    a = attack_cfg
    was = model.training
    model.eval()
    clean_acc = clean_accuracy(model, loader, device=device) if clean else None
    robust = pgd_accuracy(model, loader, eps=a.eps, alpha=a.alpha, steps=steps, norm=a.norm,
                          random_start=True, device=device, loss=loss)
    model.train(was)
    return clean_acc, robust


def epoch_record(cfg: Config, epoch: int, model: nn.Module, which: str, *, train: dict, fit: dict, val_loader,
                 curve_loader, device) -> dict:
    """The history record of epoch ``epoch`` (0-based): ``train`` (lr, the epoch's training sums),
    ``fit`` (what the rectifier fitted on validation points), and the validation and test-curve
    accuracies of ``model`` (``which``: raw / ema / swa)."""
    e = cfg.eval
    rec = {"epoch": epoch + 1, **train, "eval_model": which, **fit}
    if val_loader is not None:
        rec["val_clean"], rec["val_pgd"] = evaluate(model, val_loader, cfg.attack, e.val_attack_steps, device)
        if e.val_attack != "pgd_ce":
            from ..evaluation.pgd import VAL_ATTACKS

            rec[f"val_{e.val_attack}"] = evaluate(model, val_loader, cfg.attack, e.val_attack_steps, device,
                                                  loss=VAL_ATTACKS[e.val_attack], clean=False)[1]
    if (epoch + 1) % e.test_every == 0 or epoch + 1 == cfg.train.epochs:
        rec["test_clean"], rec["test_pgd"] = evaluate(model, curve_loader, cfg.attack, e.test_attack_steps, device)
    return rec


def epoch_line(cfg: Config, rec: dict) -> str:
    """The one line printed per epoch."""
    e, va = cfg.eval, cfg.eval.val_attack
    parts = [f"epoch {rec['epoch']}/{cfg.train.epochs}", f"loss {rec['train_loss']:.4f}",
             f"train-adv {rec['train_robust_acc']:.1f}%"]
    if "val_pgd" in rec:
        parts.append(f"val clean {rec['val_clean']:.1f}% pgd{e.val_attack_steps} {rec['val_pgd']:.1f}%"
                     + (f" {va} {rec[f'val_{va}']:.1f}%" if va != "pgd_ce" else ""))
    if "test_pgd" in rec:
        parts.append(f"test clean {rec['test_clean']:.1f}% pgd{e.test_attack_steps} {rec['test_pgd']:.1f}%")
    parts.append(f"[{rec['eval_model']}] {rec['train_time_s']:.1f}s")
    return " | ".join(parts)


class BestCheckpoint:
    """One selection criterion with its own state: the epoch whose history record scores highest
    (the first of ties) and that epoch's record; its weights are written as ``name``
    (``save(model, name, epoch, eval_model)``).  Subclasses say what scores an epoch
    (:meth:`score_of`) and what is kept of it (:meth:`entry`)."""

    name = ""

    def __init__(self, save: Callable[[nn.Module, str, int, str], object]):
        self._save = save
        self.record = {"epoch": -1, "score": -1.0}

    @property
    def epoch(self) -> int:
        """The selected epoch (1-based; -1 before any)."""
        return self.record["epoch"]

    @property
    def score(self) -> float:
        return self.record.get("score", -1.0)

    def score_of(self, rec: dict):
        """The score of an epoch's record, or None when this criterion does not score it."""
        raise NotImplementedError

    def entry(self, epoch: int, score: float, rec: dict, which: str) -> dict:
        """What is kept of the selected epoch ``epoch`` (1-based)."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, rec: dict, model: nn.Module, which: str) -> None:
        """Epoch ``epoch`` (0-based, its record ``rec``, ``model`` the evaluated weights): a higher
        score than the best so far selects it and writes its weights."""
        score = self.score_of(rec)
        if score is not None and score > self.score:
            self.record = self.entry(epoch + 1, score, rec, which)
            self._save(model, self.name, epoch + 1, which)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state: dict, epochs_done: int) -> None:
        """``epochs_done``: the epochs the checkpoint has trained (a selected epoch after them does not
        fit).  ValueError/TypeError/KeyError when the record does not fit; nothing changes then."""
        record = dict(state)
        if not -1 <= int(record["epoch"]) <= epochs_done:
            raise ValueError(f"{self.name} epoch {record['epoch']} after {epochs_done} epochs")
        self.record = record


class Best(BestCheckpoint):
    """The best checkpoint -- the papers' early-stopping protocol: the highest ``key`` of the history
    record (``{on}_pgd``, ``{on}_clean`` for ``select_by: clean``, or ``val_<attack>``)."""

    name = "best"

    def __init__(self, save, *, on: str, by: str, attack: str, key: str):
        super().__init__(save)
        self.on, self.by, self.attack, self.key = on, by, attack, key

    @property
    def score(self) -> float:
        # a 'best' entry written before "score" existed holds the validation PGD it was selected by
        return self.record.get("score", self.record.get("val_pgd", -1.0))

    def score_of(self, rec: dict):
        return rec.get(self.key)

    def entry(self, epoch: int, score: float, rec: dict, which: str) -> dict:
        entry = {"epoch": epoch, "score": score, "selected_by": self.by, "selected_on": self.on,
                 "val_pgd": rec.get("val_pgd"), "val_clean": rec.get("val_clean"),
                 "test_clean": rec.get("test_clean"), "test_pgd": rec.get("test_pgd"), "eval_model": which}
        if self.by == "robust":
            entry["val_attack" if self.on == "val" else "test_attack"] = self.attack
            if self.attack != "pgd_ce":
                entry[self.key] = rec.get(self.key)
        return entry

    def summary(self) -> dict:
        """The summary's ``best_epoch`` / ``best`` (with ``selected_on``, also for a best restored from a
        checkpoint written before it was recorded)."""
        best = {"selected_on": self.on, **{k: v for k, v in self.record.items() if k != "epoch"}}
        return {"best_epoch": self.epoch, "best": best}


class BestByCE(BestCheckpoint):
    """Beside a best selected by another attack (``eval.val_attack``: margin / DLR PGD), the checkpoint
    cross-entropy PGD would pick (``best_pgd_ce``), so a table can report both.  Inactive (it scores
    nothing) when the best is already selected by cross-entropy PGD or by clean accuracy."""

    name = "best_pgd_ce"

    def __init__(self, save, *, active: bool, key: str):
        super().__init__(save)
        self.active, self.key = active, key

    def score_of(self, rec: dict):
        return rec.get("val_pgd") if self.active else None

    def entry(self, epoch: int, score: float, rec: dict, which: str) -> dict:
        return {"epoch": epoch, "score": score, "val_pgd": score, self.key: rec.get(self.key),
                "test_pgd": rec.get("test_pgd")}

    def summary(self) -> dict:
        if self.epoch < 1:
            return {}
        return {"best_pgd_ce_epoch": self.epoch, "best_pgd_ce": {k: v for k, v in self.record.items() if k != "epoch"}}


class Selector:
    """The run's selection criteria: :class:`Best` and :class:`BestByCE`, each with its own state
    (the checkpoint's ``best`` and ``best_pgd_ce`` entries).  ``has_val``: whether the run has a
    validation split; ``save(model, which_file, epoch, eval_model)`` writes a selected checkpoint's
    weights."""

    def __init__(self, cfg: Config, has_val: bool, save: Callable[[nn.Module, str, int, str], object]):
        e = cfg.eval
        self.on, self.has_val = e.select_on, has_val
        # The papers select by validation robust accuracy; a naturally trained model (a KD / LTD
        # teacher) is selected by validation clean accuracy (its robust accuracy is ~0).
        by = e.select_by if e.select_by != "auto" else ("clean" if cfg.objective.name == "natural" else "robust")
        attack = e.val_attack if self.on == "val" else "pgd_ce"
        key = f"{self.on}_clean" if by == "clean" else (f"{self.on}_pgd" if attack == "pgd_ce" else f"val_{attack}")
        self.best = Best(save, on=self.on, by=by, attack=attack, key=key)
        self.best_pgd_ce = BestByCE(save, active=by == "robust" and attack != "pgd_ce", key=key)

    @property
    def criteria(self) -> tuple:
        return self.best, self.best_pgd_ce

    def require_split(self) -> None:
        """Refuse a run that would select on a validation split it does not have (never a silent
        fallback to the test split)."""
        if self.on == "val" and not self.has_val:
            raise ConfigError("eval.select_on", "the best checkpoint is selected on the validation split, and this "
                              "run has none (data.val_fraction is 0): set data.val_fraction > 0, or set "
                              "eval.select_on: test to select it on the test split (as the ADR code does; the "
                              "summary and the model card then say so)")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The checkpoint's entries, one per criterion (``best``, ``best_pgd_ce``)."""
        return {c.name: c.state_dict() for c in self.criteria}

    def load_state_dict(self, state: dict, epoch: int) -> None:
        """Each criterion from its entry of ``state``; a checkpoint written before ``best_pgd_ce``
        existed has none (nothing selected by it yet).  ``epoch``: the epochs done."""
        self.best.load_state_dict(state[self.best.name], epoch)
        self.best_pgd_ce.load_state_dict(state.get(self.best_pgd_ce.name) or {"epoch": -1, "score": -1.0}, epoch)

    # ------------------------------------------------------------------ per epoch
    def end_epoch(self, epoch: int, rec: dict, model: nn.Module, which: str) -> None:
        """Offer epoch ``epoch`` (0-based, its record ``rec``) to every criterion; each writes the
        weights of a new best of its own."""
        for c in self.criteria:
            c.end_epoch(epoch, rec, model, which)

    def summary(self) -> dict:
        """The summary's ``best_epoch`` / ``best`` and, when kept, ``best_pgd_ce_epoch`` / ``best_pgd_ce``."""
        return {**self.best.summary(), **self.best_pgd_ce.summary()}
