"""Seeded, stratified index orders used for every split in the package."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stratified_order"]


def stratified_order(labels: Tensor, seed: int) -> Tensor:
    """A seeded permutation of ``range(len(labels))`` in which every contiguous slice is stratified.

    Samples are shuffled, then sorted by their relative position within their own class
    ((rank + 0.5) / class count). Any prefix or window therefore holds each class in proportion to
    its frequency (to within one sample), so ``order[:n_val]`` is a stratified validation split and
    ``order[n_val:n_val + k]`` a stratified k-image training subset -- and the validation set does
    not change when ``k`` does.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    n = len(labels)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    lab = labels[perm]
    counts = torch.bincount(lab)
    by_class = torch.argsort(lab, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - starts[lab[by_class]]
    key = (rank.double() + 0.5) / counts[lab].double()
    return perm[torch.argsort(key, stable=True)]
