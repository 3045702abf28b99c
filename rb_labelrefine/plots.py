"""Training-curve plots (clean and robust accuracy per epoch)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(histories: dict, path, title: str = "") -> Path:
    """``histories``: {label: [epoch records with test_clean / test_pgd / val_pgd]} -> PNG.

    Records with ADR's ``adr_tau`` / ``adr_lambda`` (the values the next epoch uses; fitted ones
    with ``method.schedule: auto``, held between fits; dots mark the epochs that refitted) add a
    third panel with both."""
    from ._optional import require

    matplotlib = require("matplotlib", "plot", "the training-curve plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    adr = any("adr_tau" in r for hist in histories.values() for r in hist)
    fig, axes = plt.subplots(1, 3 if adr else 2, figsize=(16 if adr else 11, 4))
    for label, hist in histories.items():
        ep = [r["epoch"] for r in hist if "test_clean" in r]
        line = axes[0].plot(ep, [r["test_clean"] for r in hist if "test_clean" in r], label=label)[0]
        axes[1].plot(ep, [r["test_pgd"] for r in hist if "test_pgd" in r], label=f"{label} test", color=line.get_color())
        vep = [r["epoch"] for r in hist if "val_pgd" in r]
        if vep:
            axes[1].plot(vep, [r["val_pgd"] for r in hist if "val_pgd" in r], linestyle=":", color=line.get_color(),
                         label=f"{label} val")
        aep = [r["epoch"] for r in hist if "adr_tau" in r]
        if aep:
            axes[2].plot(aep, [r["adr_tau"] for r in hist if "adr_tau" in r], color=line.get_color(),
                         label=f"{label} tau")
            axes[2].plot(aep, [r["adr_lambda"] for r in hist if "adr_tau" in r], color=line.get_color(),
                         linestyle="--", label=f"{label} lambda")
            fit = [r for r in hist if r.get("adr_auto_fit")]   # schedule=auto: the epochs that refitted
            if fit and len(fit) < len(aep):
                for k in ("adr_tau", "adr_lambda"):
                    axes[2].plot([r["epoch"] for r in fit], [r[k] for r in fit], "o", color=line.get_color(),
                                 markersize=3, label=f"{label} fitted" if k == "adr_tau" else None)
    axes[0].set_title("clean accuracy (test subset)")
    axes[1].set_title("robust accuracy (PGD)")
    if adr:
        axes[2].set_title("ADR temperature tau / interpolation lambda")
    for i, ax in enumerate(axes):
        ax.set_xlabel("epoch")
        ax.set_ylabel("%" if i < 2 else "value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
