"""The end of an epoch's evaluation, and the choice of the best checkpoint.

Per epoch (:func:`epoch_record`): PGD-k on the held-out validation split (and, for
``eval.val_attack`` other than ``pgd_ce``, that attack too), clean and PGD-k accuracy on a fixed test
subset for the curve.  :class:`Selector` keeps the best epoch -- the papers' early-stopping protocol
-- and, beside it, the one cross-entropy PGD would pick (``best_pgd_ce``), each with its own record.

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

__all__ = ["Selector", "eval_loaders", "evaluated_model", "bn_loader", "epoch_record", "epoch_line", "evaluate"]


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


class Selector:
    """Best and best-by-CE selection.  ``has_val``: whether the run has a validation split;
    ``save(model, which_file, epoch, eval_model)`` writes a selected checkpoint's weights."""

    def __init__(self, cfg: Config, has_val: bool, save: Callable[[nn.Module, str, int, str], object]):
        e = cfg.eval
        self.on, self.has_val = e.select_on, has_val
        # The papers select by validation robust accuracy; a naturally trained model (a KD / LTD
        # teacher) is selected by validation clean accuracy (its robust accuracy is ~0).
        self.by = e.select_by if e.select_by != "auto" else ("clean" if cfg.objective.name == "natural" else "robust")
        self.attack = e.val_attack if self.on == "val" else "pgd_ce"
        self.key = f"{self.on}_clean" if self.by == "clean" else (
            f"{self.on}_pgd" if self.attack == "pgd_ce" else f"val_{self.attack}")
        self._save = save
        self.best = {"epoch": -1, "score": -1.0}
        self.best_pgd_ce = {"epoch": -1, "score": -1.0}   # kept only when the selecting attack is not pgd_ce

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
        return {"best": dict(self.best), "best_pgd_ce": dict(self.best_pgd_ce)}

    def load_state_dict(self, state: dict, epoch: int) -> None:
        """``state`` holds ``best`` (and, from checkpoints that have it, ``best_pgd_ce``); ``epoch``:
        the epochs done (a best epoch after them does not fit).  ValueError/TypeError/KeyError when the
        records do not fit."""
        best = dict(state["best"])
        best_pgd_ce = dict(state.get("best_pgd_ce") or {"epoch": -1, "score": -1.0})
        if not -1 <= int(best.get("epoch", -1)) <= epoch:
            raise ValueError(f"best epoch {best.get('epoch')} after {epoch} epochs")
        self.best, self.best_pgd_ce = best, best_pgd_ce

    # ------------------------------------------------------------------ per epoch
    def end_epoch(self, epoch: int, rec: dict, model: nn.Module, which: str) -> None:
        """Compare epoch ``epoch`` (0-based, its record ``rec``) with the best so far; write the weights
        of a new best."""
        score = rec.get(self.key)
        if score is not None and score > self.best.get("score", self.best.get("val_pgd", -1.0)):
            self.best = {"epoch": epoch + 1, "score": score, "selected_by": self.by, "selected_on": self.on,
                         "val_pgd": rec.get("val_pgd"), "val_clean": rec.get("val_clean"),
                         "test_clean": rec.get("test_clean"), "test_pgd": rec.get("test_pgd"), "eval_model": which}
            if self.by == "robust":
                self.best["val_attack" if self.on == "val" else "test_attack"] = self.attack
                if self.attack != "pgd_ce":
                    self.best[self.key] = rec.get(self.key)
            self._save(model, "best", epoch + 1, which)
        # the checkpoint cross-entropy PGD would pick, beside the one the other attack picks
        ce_score = rec.get("val_pgd") if self.by == "robust" and self.attack != "pgd_ce" else None
        if ce_score is not None and ce_score > self.best_pgd_ce.get("score", -1.0):
            self.best_pgd_ce = {"epoch": epoch + 1, "score": ce_score, "val_pgd": ce_score,
                                self.key: rec.get(self.key), "test_pgd": rec.get("test_pgd")}
            self._save(model, "best_pgd_ce", epoch + 1, which)

    def summary(self) -> dict:
        """The summary's ``best_epoch`` / ``best`` (with ``selected_on``, also for a best restored from a
        checkpoint written before it was recorded) and, when kept, ``best_pgd_ce``."""
        best = {"selected_on": self.on, **{k: v for k, v in self.best.items() if k != "epoch"}}
        out = {"best_epoch": self.best["epoch"], "best": best}
        if self.best_pgd_ce["epoch"] >= 1:
            out["best_pgd_ce_epoch"] = self.best_pgd_ce["epoch"]
            out["best_pgd_ce"] = {k: v for k, v in self.best_pgd_ce.items() if k != "epoch"}
        return out
