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

# The public names are imported on first use (PEP 562), so that `rb-labelrefine --help` and
# `rb-labelrefine configs` answer without importing torch (seconds) -- see cli.py.
_EXPORTS = {
    "averaging": ("AWP", "EMA", "SWA", "bn_update", "scale_decay"),
    "losses": ("kd_loss", "soft_cross_entropy", "trades_kl"),
    "objectives": ("PGDAT", "TRADES", "build_objective"),
    "rectifiers": ("ADR", "LTD", "SGLR", "KDSelfTeachers", "KDTerm", "LabelSmoothing", "OneHot", "Rectifier",
                   "Target", "rectify"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", "ADR", "SGLR", "LTD", "KDSelfTeachers", "OneHot", "LabelSmoothing", "Rectifier",
           "Target", "KDTerm", "rectify", "EMA", "SWA", "AWP", "bn_update", "scale_decay", "PGDAT", "TRADES",
           "build_objective", "soft_cross_entropy", "kd_loss", "trades_kl"]


# Subpackages and modules reachable as attributes after `import rb_labelrefine as rl` (rl.models,
# rl.data, ...), imported on first access like the names above; optional extras (timm, robustbench,
# matplotlib) are imported only when a function that needs them is called.
_SUBMODULES = ("attacks", "averaging", "compat", "config", "data", "doctor", "evaluation", "export", "leaderboard",
               "losses", "models", "objectives", "plots", "quickstart", "rectifiers", "runs", "training")


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # sets the attribute on this package
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rb_labelrefine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
