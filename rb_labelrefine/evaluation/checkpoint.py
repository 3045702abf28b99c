"""AutoAttack a run's checkpoint on the run's own test points -- one function for the trainer's
final stage, ``rb-labelrefine eval``, the quickstart and the benchmarks.

The test points are the run's test split as it was trained (``data.name``, ``data.seed``,
``data.val_fraction``, ``data.train_subset``, ``data.test_subset``: the same images in the same
order), images ``offset .. offset + n - 1`` of it; the suite is AutoAttack's ``standard``
version (RobustBench's protocol), ``plus`` or ``rand``, ``apgd`` (its first two stages, APGD-CE
and APGD-T, with the standard version's settings) or a custom list of attacks.  The result is
:func:`~rb_labelrefine.evaluation.autoattack.run_autoattack`'s summary, whose ``robust_correct``
(and ``per_attack_correct``: after each stage) are the per-point outcomes, with where the points
came from (``which``, ``offset``, ``suite``).

Importing this module imports neither the trainer nor the data sets (both are read on use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from ..errors import BadInputError

__all__ = ["evaluate_checkpoint", "stack_test_points", "run_test_split", "AUTOATTACK_SUITES"]

#: suite -> (AutoAttack version, attacks, settings): ``apgd`` is the standard version's first two
#: stages with its settings (one restart, 9 target classes), FAB-T and Square not run
AUTOATTACK_SUITES = {
    "standard": ("standard", None, {}),
    "plus": ("plus", None, {}),
    "rand": ("rand", None, {}),
    "apgd": ("custom", ["apgd-ce", "apgd-t"], {"apgd.n_restarts": 1}),
}


def stack_test_points(data, n: Optional[int] = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: items ``offset .. offset + n - 1`` of a data set of ``(image, label[, ...])``
    (all from ``offset`` on when ``n`` is None), stacked in order; ``data`` may also be a pair of
    tensors ``(x, y)`` already stacked."""
    pair = isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data)
    if pair and len(data[0]) != len(data[1]):
        raise ValueError(f"test points: {len(data[0])} images but {len(data[1])} labels")
    size = len(data[0]) if pair else len(data)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < max(size, 1):
        raise BadInputError(f"offset must be an integer in [0, {size}) (the test points), got {offset!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise BadInputError(f"n must be a positive integer (the number of test points), got {n!r}")
    end = size if n is None else min(size, offset + n)
    if pair:
        return data[0][offset:end], data[1][offset:end].long()
    xs, ys = [], []
    for i in range(offset, end):
        item = data[i]
        xs.append(item[0])
        ys.append(int(item[1]))
    if not xs:
        raise BadInputError("no test points to evaluate (the test split is empty)")
    return torch.stack(xs), torch.tensor(ys)


def run_test_split(cfg, data_root=None):
    """The test split of the run whose config is ``cfg``, as it was trained (its subsets and seed)."""
    from .. import data as _data   # (read on use: monkeypatching and import time)

    d = cfg.data
    _, _, test, _ = _data.build_datasets(d.name, root=data_root or d.root, val_fraction=d.val_fraction,
                                         train_subset=d.train_subset, seed=d.seed, test_subset=d.test_subset,
                                         image_size=getattr(d, "image_size", None))
    return test


def evaluate_checkpoint(run_dir=None, which: str = "best", *, model: Optional[nn.Module] = None, cfg=None,
                        n: Optional[int] = None, offset: int = 0, suite: str = "standard",
                        attacks: Optional[Sequence[str]] = None, norm: Optional[str] = None,
                        eps: Optional[float] = None, attack_params: Optional[dict] = None,
                        seed: Optional[int] = 0, batch_size: int = 250, device=None, data_root=None,
                        test_data=None, log=None) -> dict:
    """AutoAttack ``which`` (``best``/``final``/``best_pgd_ce``) of the run in ``run_dir`` on the
    run's test points ``offset .. offset + n - 1`` (``n=None``: all from ``offset``).

    Args:
        model, cfg: the checkpoint already loaded and its run's config (then ``run_dir`` is not
            read; the trainer passes its own); otherwise both come from
            :func:`~rb_labelrefine.runs.load_run_model`.
        suite: a key of :data:`AUTOATTACK_SUITES`; ``attacks`` (e.g. ``["apgd-ce"]``) runs a custom
            list instead (recorded as suite ``custom``).
        norm, eps: the threat model (default: the run's ``attack.norm`` / ``attack.eps``).
        attack_params: AutoAttack sub-attack overrides (quick runs: never reported as standard).
        seed, batch_size: AutoAttack's.  device: default ``cuda`` when available, else ``cpu``.
        data_root: where the run's data set is (default: its ``data.root``).
        test_data: the run's test split already built (a data set of ``(image, label, ...)``, or the
            tensors ``(x, y)``).
        log: told of config fields accepted as added after the weights were written.

    Returns :func:`~rb_labelrefine.evaluation.autoattack.run_autoattack`'s dict (``clean_acc``,
    ``robust_acc``, ``n``, ``robust_correct`` per point, ``per_attack_correct`` per stage, ...)
    with ``which``, ``offset`` and ``suite`` added.
    """
    from . import autoattack as _aa

    if attacks:
        version, attacks, preset_params = "custom", list(attacks), {}
        suite = "custom"
    elif suite in AUTOATTACK_SUITES:
        version, attacks, preset_params = AUTOATTACK_SUITES[suite]
    else:
        raise BadInputError(f"suite must be one of {', '.join(AUTOATTACK_SUITES)} (or attacks=[...]), got {suite!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        if run_dir is None:
            raise ValueError("evaluate_checkpoint needs run_dir, or model and cfg")
        from .. import runs as _runs

        model, cfg, _ = _runs.load_run_model(Path(run_dir), which, device=device, **({"log": log} if log else {}))
    elif cfg is None:
        raise ValueError("evaluate_checkpoint: a model given without its run's cfg")
    if test_data is None:
        test_data = run_test_split(cfg, data_root)
    x, y = stack_test_points(test_data, n, offset)
    params = {**preset_params, **(attack_params or {})}
    res = _aa.run_autoattack(model, x, y, norm=norm or cfg.attack.norm,
                             eps=eps if eps is not None else cfg.attack.eps, version=version, attacks=attacks,
                             attack_params=params or None, device=device, seed=seed, batch_size=batch_size)
    res.update(which=which, offset=offset, suite=suite)
    return res
