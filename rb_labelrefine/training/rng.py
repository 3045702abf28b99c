"""The run's random state: what a checkpoint restores, and what it deliberately does not.

* **torch's global generator** (CPU, and CUDA when present) draws the model's initialisation, the
  attacks' random starts, dropout and the per-item augmentation: seeded with ``train.seed``,
  checkpointed and restored exactly (:func:`state_dict` / :func:`load_state_dict`).  The epoch
  order has its own ``torch.Generator`` (the batch stream's), independent of this one.
* **Python's** ``random`` **and numpy's global generator** are drawn from by nothing in the
  package, but by *imports*: ``import rich`` (which ``sklearn.datasets`` imports when it is
  installed) draws from ``random``.  A module that is imported lazily after the run was seeded
  shifts their state by an amount that depends on which packages the user has installed and on
  what the process imported before -- so checkpointing them made a resumed run "bit-exact" only
  in some environments (issue 26).  They are therefore not part of the checkpoint; instead
  :func:`reseed_globals` seeds both from ``(train.seed, epoch, batch, rank)`` right before each
  training batch is fetched.  User code that draws from them (a transform of a custom data set in
  the main process) sees the same numbers in an uninterrupted run and in a resumed one, whatever
  was imported in between.  (DataLoader workers seed ``random``/numpy themselves from the
  loader's generator, which the stream re-seeds per epoch.)

A checkpoint written before this change also holds ``python``/``numpy`` entries; they are ignored.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["state_dict", "load_state_dict", "seed_all", "reseed_globals"]

# Keeps the per-batch seeds of the global generators apart from every other seed derived from
# train.seed (the epoch order's seed*100003+epoch, the aux stream's SeedSequence tag).
_GLOBALS_TAG = 0x7A1E5EED


def seed_all(seed: int) -> None:
    """Seed torch's generators (the run's randomness) and, for code that runs before the first
    batch, Python's and numpy's global ones."""
    torch.manual_seed(seed)
    reseed_globals(seed, 0, 0, 0)


def reseed_globals(seed: int, epoch: int, batch: int, rank: int = 0) -> None:
    """Seed Python's ``random`` and numpy's global generator from ``(seed, epoch, batch, rank)``:
    a function of the position in the run only, so imports cannot make an uninterrupted and a
    resumed run differ.  Costs a few microseconds per batch."""
    words = np.random.SeedSequence([_GLOBALS_TAG, int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(batch),
                                    int(rank)]).generate_state(4, np.uint32)
    random.seed(int.from_bytes(words.tobytes(), "little"))
    np.random.seed(words)


def state_dict() -> dict:
    """torch's CPU and CUDA generator states (see the module's docstring for what is not here)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def load_state_dict(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
