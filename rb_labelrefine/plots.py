"""Training-curve plots (clean and robust accuracy per epoch)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(histories: dict, path, title: str = "") -> Path:
    """``histories``: {label: [epoch records with test_clean / test_pgd / val_pgd]} -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .training.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories.items():
        ep = [r["epoch"] for r in hist if "test_clean" in r]
        line = axes[0].plot(ep, [r["test_clean"] for r in hist if "test_clean" in r], label=label)[0]
        axes[1].plot(ep, [r["test_pgd"] for r in hist if "test_pgd" in r], label=f"{label} test", color=line.get_color())
        vep = [r["epoch"] for r in hist if "val_pgd" in r]
        if vep:
            axes[1].plot(vep, [r["val_pgd"] for r in hist if "val_pgd" in r], linestyle=":", color=line.get_color(),
                         label=f"{label} val")
    axes[0].set_title("clean accuracy (test subset)")
    axes[1].set_title("robust accuracy (PGD)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
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
