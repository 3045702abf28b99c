"""Loss functions shared by every objective and rectifier.

All of them accept *distributions* as targets, so a rectified label is a drop-in replacement
for the one-hot label (ADR Sec. 4.2: "replace the hard labels in their objectives").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_cross_entropy", "kd_loss", "trades_kl", "as_distribution"]


def as_distribution(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels -> one-hot float distribution; a [B, C] distribution is returned as is."""
    if target.dim() == 1:
        return F.one_hot(target.long(), num_classes).to(torch.float32)
    return target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-sum_c t_c log softmax(z)_c`` against integer labels or a [B, C] distribution.

    With integer labels this is exactly ``F.cross_entropy`` (which we call, for speed).
    """
    if target.dim() == 1:
        return F.cross_entropy(logits, target, reduction=reduction)
    loss = -(target.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            reduction: str = "mean") -> torch.Tensor:
    """Hinton KD term used by Chen et al. 2021 (Eq. 1-2):
    ``KD_T(s, t) = T^2 * sum_c softmax(t/T)_c * (-log softmax(s/T)_c)``.

    This is also what the public KD+SWA code computes (``utils.loss_fn_kd``: T^2 times the
    cross-entropy of the tempered student against the tempered teacher, averaged over the batch),
    so the values match it, not only the gradients.  The paper's Sec. 3 calls the terms KL
    divergences (its Appendix A2.1 writes the cross-entropy); a KL differs from this by the
    teacher's entropy -- a constant, so the gradients are the same either way.
    """
    t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (temperature ** 2) * soft_cross_entropy(student_logits / temperature, t, reduction=reduction)


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """TRADES robust term ``KL(softmax f(x) || softmax f(x'))`` averaged over the batch
    (Zhang et al. 2019, the public code's ``KLDivLoss(size_average=False) / batch_size``)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
