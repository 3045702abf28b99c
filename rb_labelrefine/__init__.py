"""rb_labelrefine: label-refinement adversarial training (ADR, KD+SWA, LTD, SGLR) for the
PyTorch robustness ecosystem (torchattacks, AutoAttack, RobustBench, timm).

Attach a method to your own torchattacks loop::

    import rb_labelrefine as rl
    rect = rl.ADR.cifar10(model, total_steps=len(loader) * epochs).to(device)
    atk = torchattacks.PGD(model, eps=8/255, alpha=2/255, steps=10)
    for epoch in range(epochs):
        for x, y, idx in loader:                      # rb_labelrefine.data.IndexedDataset
            target = rect.targets(x, y, index=idx)
            x_adv = atk(x, target.for_attack)
            loss = target.loss(model(x_adv), x_adv)
            opt.zero_grad(); loss.backward(); opt.step()
            rect.after_step(model)
        rect.end_epoch(model)
"""
__version__ = "0.1.0"

from .averaging import AWP, EMA, SWA, bn_update, scale_decay
from .losses import kd_loss, soft_cross_entropy, trades_kl
from .objectives import PGDAT, TRADES, build_objective
from .rectifiers import (ADR, LTD, SGLR, KDSelfTeachers, KDTerm, LabelSmoothing, OneHot, Rectifier, Target,
                         rectify)

__all__ = ["__version__", "ADR", "SGLR", "LTD", "KDSelfTeachers", "OneHot", "LabelSmoothing", "Rectifier",
           "Target", "KDTerm", "rectify", "EMA", "SWA", "AWP", "bn_update", "scale_decay", "PGDAT", "TRADES",
           "build_objective", "soft_cross_entropy", "kd_loss", "trades_kl"]
