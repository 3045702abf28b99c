"""The final stage of a run, after its last training step: the final weights, the curves, the
end-of-run AutoAttack (``eval.autoattack``, rank 0) and ``summary.json`` -- written last, so a run
is finished exactly when its summary exists.

A signal in this stage stops at the next safe point (:meth:`Finisher.stop_point`): the checkpoint of
the last epoch is on disk, so ``--resume`` skips training and redoes only this stage.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runs import RUN_FILES
from .distributed import is_main_process
from .errors import TrainingInterrupted

__all__ = ["Finisher", "effective_decays", "test_points"]


def effective_decays(wa, rectifier) -> dict:
    """The per-step decays the run used (rescaled to its steps per epoch): WA's (``wa``: the WA
    :class:`~rb_labelrefine.averaging.EMA` or None) and those the rectifier declares
    (:meth:`~rb_labelrefine.rectifiers.base.Rectifier.effective_decays`, e.g. ADR's teacher)."""
    return {**({"wa": wa.decay} if wa is not None else {}), **rectifier.effective_decays()}


def test_points(test_ds, num_classes: int, n) -> tuple:
    """The first ``n`` test points (all for None), checked: what the end-of-run AutoAttack attacks."""
    from .stream import check_batch, stack

    x, y = stack(test_ds, n)
    check_batch(x, y, None, num_classes, "test data (AutoAttack)")
    return x, y


class Finisher:
    """The final stage of ``cfg``'s run in ``run`` (a :class:`~rb_labelrefine.training.rundir.RunDir`),
    stopping at its safe points when ``stop`` (a :class:`~rb_labelrefine.training.signals.StopSignal`)
    is requested."""

    def __init__(self, cfg, run, stop, log: Callable[[str], None]):
        self.cfg, self.run, self.stop, self.log = cfg, run, stop, log

    def stop_point(self, done: str) -> None:
        if not self.stop.requested:
            return
        raise TrainingInterrupted(
            f"stopped by {self.stop.name} after training finished (all {self.cfg.train.epochs} epochs; {done}); the "
            f"final stage was not completed ({RUN_FILES['summary']} not written); resuming skips training and redoes "
            f"only that stage. {self.run.resume_hint()}")

    def __call__(self, model, which: str, *, info, history: list, selection: dict, facts: dict) -> dict:
        """``model`` (``which``: raw / ema / swa) becomes the final weights; ``selection`` is the
        selector's summary, ``facts`` what the run adds (steps per epoch, device, seconds, decays)."""
        cfg, run = self.cfg, self.run
        self.stop_point("nothing of the final stage written yet")
        final_path = run.write_weights(model, "final", run.weights_meta(info, cfg.train.epochs, which))
        self.stop_point(f"final weights written to {final_path}")
        last = history[-1] if history else {}
        final_keys = ("val_clean", "val_pgd", "test_clean", "test_pgd") + \
            ((f"val_{cfg.eval.val_attack}",) if cfg.eval.val_attack != "pgd_ce" else ())
        summary = {
            "name": cfg.name, "method": cfg.method.name, "objective": cfg.objective.name,
            "dataset": info.name, "arch": cfg.model.arch, "epochs": cfg.train.epochs,
            "steps_per_epoch": facts["steps_per_epoch"], "device": str(facts["device"]),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "train_seconds": round(facts["elapsed"], 2), "attack_bn_mode": cfg.attack.bn_mode, "eval_model": which,
            "effective_decays": facts["effective_decays"],
            **selection,
            "final": {"epoch": cfg.train.epochs, **{k: last.get(k) for k in final_keys}},
            "paths": {"best": str(run.path("best")), "final": str(final_path), "config": str(run.path("config")),
                      "history": str(run.path("history")), "checkpoint": str(run.path("checkpoint"))},
        }
        curves = run.write_curves(history)
        if curves is not None:
            summary["paths"]["curves"] = str(curves)
        if cfg.eval.autoattack and is_main_process():  # [DDP] AutoAttack on rank 0 only
            summary["autoattack"] = self.autoattack(info, facts["device"], facts["test_points"])
        self.stop_point("final weights written, evaluation done")
        run.write_summary(summary)
        return summary

    def autoattack(self, info, device, test_points: Callable[[int], tuple]) -> dict:
        """AutoAttack (official, ``eval.autoattack_version``) on the best and the final weights, on the
        first ``eval.autoattack_n`` test points (``test_points(n)``: the checked ``(x, y)``), through
        the package's one :func:`~rb_labelrefine.evaluation.checkpoint.evaluate_checkpoint`."""
        from ..evaluation.checkpoint import evaluate_checkpoint
        from ..runs import build_model_for, read_weights

        cfg = self.cfg
        points = test_points(cfg.eval.autoattack_n)
        out = {}
        for which in ("best", "final"):
            model = build_model_for(cfg, info).to(device)
            state, _ = read_weights(self.run.path(which))
            model.load_state_dict(state)
            model.eval()
            res = evaluate_checkpoint(which=which, model=model, cfg=cfg, suite=cfg.eval.autoattack_version,
                                      seed=cfg.train.seed, batch_size=cfg.eval.batch_size, device=str(device),
                                      test_data=points)
            out[which] = res
            self.log(f"AutoAttack ({cfg.eval.autoattack_version}) on {which}: clean {res['clean_acc']:.2f}%  "
                     f"robust {res['robust_acc']:.2f}%  ({res['n']} points, {res.get('elapsed_s', 0):.0f}s)")
            if which == "best":
                self.stop_point("final weights written; AutoAttack done on the best weights only")
        return out
