"""Distributed data parallel for the built-in trainer: ``torchrun --nproc_per_node=N``.

    torchrun --nproc_per_node=2 -m rb_labelrefine train --config cifar10-resnet18-pgdat-adr --out runs/x
    (or: torchrun --nproc_per_node=2 $(which rb-labelrefine) train ...)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE > 1 the
trainer joins a process group (``nccl`` on CUDA -- one GPU per process, ``cuda:LOCAL_RANK`` --,
``gloo`` on the CPU).  What each part does:

* **data** (the batch stream, :mod:`rb_labelrefine.training.stream`): ``data.batch_size`` stays the
  *global* batch.  Every rank walks the same deterministic epoch order (same seed, same epoch, same
  mid-epoch skip) in global batches and takes its contiguous slice of each: rank ``r`` of ``W`` gets
  ``B/W`` samples (sizes differ by at most one when ``W`` does not divide a batch).  Generated rows
  (``data.aux``) are shared out the same way: every rank advances the one seeded auxiliary stream by
  the global batch's count and reads only its own slice, so the shares are disjoint and every rank's
  stream position is the checkpoint's.  The union of the ranks' step-``k`` batches is the
  single-process step-``k`` batch; per-sample state indexes generated rows after the real ones.
* **model**: initial weights, buffers, the averaged copies (WA, SWA, ADR's EMA) and the teachers are
  broadcast from rank 0; the training forward goes through ``DistributedDataParallel``
  (gradients averaged in backward).  The attack runs on the *unwrapped* module: crafting x' only
  differentiates w.r.t. the input and must not touch DDP's reducer (no gradient all-reduce, no
  "reduction not finished" state).  When a rank's share of an uneven batch differs, its loss is
  weighted by ``n_rank * W / n_global`` so the averaged gradient is that of the global-batch mean.
* **BatchNorm**: each rank normalises with its own per-rank batch statistics (as DDP does; use
  SyncBatchNorm-free models for an exact match with one process).  After every optimizer step the
  buffers (running statistics) are broadcast from rank 0, so every rank -- and every EMA of the
  weights and buffers -- holds identical values.
* **per-sample state** (SGLR's memory): each rank updates the rows of its samples; the updated rows
  and their indices are all-gathered after the step (:meth:`Rectifier.synchronize`).
* **AWP**: the proxy gradients are averaged across ranks, so every rank applies the same
  perturbation (that of the global batch).
* **metrics**: the epoch's loss/accuracy sums and counts are all-reduced; evaluation (validation
  PGD, test curve, SWA's BatchNorm pass) runs identically on every rank -- same weights, same RNG
  stream -- so the best-epoch decision agrees without communication; AutoAttack runs on rank 0.
* **files and logs**: written by rank 0 only (:func:`rank_zero_only`); the other ranks are quiet.
* **signals / non-finite loss**: the trainer's one signal handler (training/signals.py, the one
  owner of the stop state) notes a SIGTERM/SIGINT as pending during training, and ranks agree
  before acting (an all-reduce of the flags, :meth:`DistributedContext.any_true`), so all of them stop
  -- or raise -- at the same step.  After the last step (final weights, AutoAttack: no collectives
  left) a signal stops the rank at the next safe point, as in a single process.  The run
  directory's lock is taken by rank 0, the only writer.

Random starts: all ranks share one RNG stream (same seed; the checkpoint stores one RNG state), so
the rank-``r`` slice of a batch draws the same noise as rank 0's slice.  With
``attack.random_start=false`` (PGD) a distributed run equals the single-process run up to float
summation order; with random starts it is a statistically equivalent run, not the same numbers.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .stream import ShardedBatchSampler, slice_bounds  # noqa: F401 (re-exported: the data split lives in stream.py)

from ..errors import EXIT_FAILED, PackageError

__all__ = ["DistributedContext", "ShardedBatchSampler", "init_distributed", "is_main_process", "rank_zero_only",
           "env_world", "launch_command", "DistributedTimeoutError", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0   # train.dist_timeout_s
_ANSWER_KEY = "rb_labelrefine/answering/{}"


class DistributedTimeoutError(PackageError, RuntimeError):
    """Under torchrun a collective got no answer from some rank within ``train.dist_timeout_s``
    (a rank frozen, stopped or killed): every live rank stops with this, naming the silent rank(s);
    the last checkpoint is resumable (exit 1, as a failed run)."""
    exit_code = EXIT_FAILED


def launch_command() -> str:
    """How this process was started, for the printed resume command: ``rb-labelrefine`` in one
    process; under torchrun ``torchrun --nproc_per_node=N -m rb_labelrefine`` (with ``--nnodes``
    when the job spans several nodes: LOCAL_WORLD_SIZE is torchrun's --nproc_per_node)."""
    _, world, _ = env_world()
    if world <= 1:
        return "rb-labelrefine"
    try:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        per_node = world
    per_node = per_node if 1 <= per_node <= world else world
    nodes = world // per_node
    return f"torchrun {f'--nnodes={nodes} (and your rendezvous options) ' if nodes > 1 else ''}" \
           f"--nproc_per_node={per_node} -m rb_labelrefine"


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (0, 1, 0 when absent)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_zero_only(fn: Callable, *, returns_path_arg: Optional[int] = None) -> Callable:
    """``fn`` on rank 0 (or without a process group); elsewhere a no-op that returns ``None`` or,
    with ``returns_path_arg=i``, ``Path(args[i])`` (for writers that return the written path)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main_process():
            return fn(*args, **kwargs)
        if returns_path_arg is not None and len(args) > returns_path_arg:
            return Path(args[returns_path_arg])
        return None
    wrapper.__wrapped_rank_zero__ = fn
    return wrapper


class DistributedContext:
    """The process group as the trainer sees it.  ``enabled`` is False in a single process, and
    then every method is a cheap no-op."""
    timeout_s = DEFAULT_TIMEOUT_S   # train.dist_timeout_s (set by init_distributed)

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: Optional[str] = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend = backend
        self.enabled = world_size > 1
        self._buffers: Optional[list] = None
        self._carried = (0.0, 0.0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def any_true(self, flag: bool) -> bool:
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def average(self, tensors: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """Mean over ranks of each tensor (``None`` entries stay ``None``), one flat all-reduce."""
        present = [t for t in tensors if t is not None]
        if not self.enabled or not present:
            return tensors
        flat = torch._utils._flatten_dense_tensors([t.contiguous() for t in present])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        out = iter(torch._utils._unflatten_dense_tensors(flat, present))
        return [None if t is None else next(out) for t in tensors]

    def all_gather_rows(self, t: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        """Concatenate ``t`` from every rank, in rank order.  ``sizes``: every rank's number of rows
        when known in advance (then no size exchange, i.e. no host sync on a GPU); otherwise any
        length along dim 0 (the sizes are all-gathered first)."""
        if not self.enabled:
            return t
        dev = self._comm_device
        t = t.to(dev)
        if sizes is None:
            n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
            got = [torch.zeros_like(n) for _ in range(self.world_size)]
            dist.all_gather(got, n)
            sizes = [int(s) for s in got]
        elif t.shape[0] != sizes[self.rank]:
            raise RuntimeError(f"all_gather_rows: rank {self.rank} has {t.shape[0]} rows, expected {sizes[self.rank]}")
        m = max(sizes)
        padded = t.new_zeros((m,) + tuple(t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def broadcast_module(self, module: nn.Module) -> None:
        """Parameters and buffers of ``module`` from rank 0."""
        if not self.enabled:
            return
        tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        with torch.no_grad():
            for group in _by_dtype(tensors):
                flat = torch._utils._flatten_dense_tensors([t.data for t in group])
                dist.broadcast(flat, src=0)
                for t, v in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                    t.data.copy_(v)

    # ------------------------------------------------------------------ trainer hooks
    def rank_device(self, device: torch.device) -> torch.device:
        """This rank's device for the configured one: ``cuda:LOCAL_RANK`` under torchrun on CUDA."""
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def carry_epoch_sums(self, acc: Optional[dict]) -> None:
        """At the start of an epoch: a resumed epoch carries its partial sums.  The checkpoint holds
        every rank's own float32 running sums where they stopped (``loss@r``/``correct@r``, written
        by :meth:`reduce_epoch_sums`): each rank continues its own -- ``acc``'s ``loss``/``correct``
        are set to this rank's in place, for ``EpochSums.begin`` -- so the epoch's sums are those of
        the uninterrupted run to the last bit (continuing from the already-reduced total on every
        rank and subtracting it again afterwards rounds differently: ``train_loss`` differed in
        the 8th digit).  A checkpoint of another world size (or from before) falls back to the
        total, counted once."""
        acc = acc if acc is not None else {}
        own = _own_partial(acc, self.rank, self.world_size) if self.enabled else None
        if own is not None:
            acc["loss"], acc["correct"] = own
            self._carried = (0.0, 0.0)
        else:
            self._carried = (float(acc.get("loss", 0.0)), float(acc.get("correct", 0.0)))

    def broadcast_modules(self, mods) -> None:
        """Rank 0's initial weights everywhere: the model, WA/SWA copies, the rectifier's modules
        (each module once)."""
        seen = set()
        for m in mods:
            if id(m) not in seen:
                seen.add(id(m))
                self.broadcast_module(m)

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        dev = next(model.parameters()).device
        # buffers: synchronised once at construction and after each step (after_update), not before
        # every forward (newer torch spells this forward_sync_buffers=False, older broadcast_buffers=False)
        kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
              else {"broadcast_buffers": False})
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **kw)

    @contextlib.contextmanager
    def timeouts(self, hint: Callable[[], str] = lambda: ""):
        """A collective that times out inside the block is a :class:`DistributedTimeoutError` naming
        the rank(s) that stopped answering (those that did not report to the rendezvous store
        within a grace period; rank 0 when the store itself -- served by rank 0 -- does not answer)
        and ``hint()`` (the resume command)."""
        try:
            yield
        except DistributedTimeoutError:
            raise
        except Exception as exc:   # noqa: BLE001 -- only a collective's timeout is converted
            if not self.enabled or not _is_timeout(exc):
                raise
            silent = self.silent_ranks()
            who = (f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}") if silent \
                else f"another of the {self.world_size} ranks"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DistributedTimeoutError(
                f"rank {self.rank}: {who} stopped answering: a collective got no answer within train.dist_timeout_s="
                f"{self.timeout_s:g} s ({first}); the rank was frozen, stopped, "
                f"killed or out of memory. {hint()}".rstrip()) from None

    def silent_ranks(self, grace_s: Optional[float] = None) -> list:
        """After a timeout: the ranks that do not report themselves alive to the rendezvous store
        within ``grace_s`` (default: the timeout, at most 30 s).  Every live rank reports and waits."""
        if not self.enabled:
            return []
        grace = min(self.timeout_s, 30.0) if grace_s is None else grace_s
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(datetime.timedelta(seconds=max(grace, 1.0)))
            store.set(_ANSWER_KEY.format(self.rank), "1")
            deadline = time.monotonic() + grace
            while True:
                silent = [r for r in range(self.world_size)
                          if r != self.rank and not store.check([_ANSWER_KEY.format(r)])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.1)
        except Exception:   # noqa: BLE001 -- the store (on rank 0) does not answer either
            return [0] if self.rank != 0 else []

    def loss_weight(self, n_local: int, n_global: int) -> float:
        """``n_rank * W / n_global`` for the global batch of this step (1 for equal shares)."""
        return float(n_local * self.world_size) / float(n_global)

    def sync_step(self, model: nn.Module, rectifier, sizes) -> None:
        """After the optimizer step: identical buffers and per-sample state on every rank (the
        stop-signal agreement is :meth:`StopSignal.agree <rb_labelrefine.training.signals.StopSignal.agree>`
        over :meth:`any_true`).  ``sizes``: every rank's rows of this step's batch, in rank order
        (:meth:`BatchStream.rank_sizes <rb_labelrefine.training.stream.BatchStream.rank_sizes>`), or the
        global batch's row count (then shared as :func:`slice_bounds` does)."""
        if self._buffers is None:
            self._buffers = [b for name, b in model.named_buffers() if name not in ("mean", "std")]
        if self._buffers:
            with torch.no_grad():
                for group in _by_dtype(self._buffers):
                    flat = torch._utils._flatten_dense_tensors(group)
                    dist.broadcast(flat, src=0)
                    torch._foreach_copy_(group, list(torch._utils._unflatten_dense_tensors(flat, group)))
        if isinstance(sizes, int):
            sizes = [b - a for a, b in (slice_bounds(sizes, r, self.world_size) for r in range(self.world_size))]
        rectifier.synchronize(functools.partial(self.all_gather_rows, sizes=sizes))

    def reduce_epoch_sums(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
                          acc: Optional[dict] = None) -> int:
        """All-reduce the epoch's running sums in place; returns the global sample count.  With
        ``acc`` (the epoch's checkpointed sums) every rank's own running sums before the reduction
        are kept there as ``loss@r``/``correct@r`` (see :meth:`carry_epoch_sums`)."""
        if not self.enabled:
            return seen
        if not self.is_main:  # partial sums carried over a resume are on every rank: count them once
            loss_sum -= self._carried[0]
            correct -= self._carried[1]
        self._carried = (0.0, 0.0)
        dev = self._comm_device
        if acc is not None:   # float32 values, exact as doubles
            local = torch.stack([loss_sum.detach().double().to(dev), correct.detach().double().to(dev)])
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local)
            for r, p in enumerate(parts):
                acc[f"loss@{r}"], acc[f"correct@{r}"] = float(p[0]), float(p[1])
        t = torch.stack([loss_sum.detach().double().to(dev), correct.detach().double().to(dev),
                         torch.tensor(float(seen), dtype=torch.float64, device=dev)])
        dist.all_reduce(t)
        loss_sum.copy_(t[0])
        correct.copy_(t[1])
        return int(round(float(t[2])))


def _own_partial(acc: dict, rank: int, world_size: int):
    """``(loss, correct)`` of ``rank``'s own running sums in a checkpoint's epoch sums, or None when
    they are not there for exactly ``world_size`` ranks."""
    ranks = {k.split("@", 1)[1] for k in acc if k.startswith("loss@")}
    if ranks != {str(r) for r in range(world_size)} or f"correct@{rank}" not in acc:
        return None
    return float(acc[f"loss@{rank}"]), float(acc[f"correct@{rank}"])


def _by_dtype(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def init_distributed(device: torch.device, timeout_s: Optional[float] = None) -> DistributedContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); ``nccl`` for a CUDA ``device``.
    ``timeout_s`` (``train.dist_timeout_s``): how long a collective waits for every rank."""
    rank, world, local = env_world()
    if world <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout_s = float(timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S)
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_destroy)
    else:   # joined before (an earlier run in this process): its timeout stays
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    ctx = DistributedContext(rank, world, local, backend)
    ctx.timeout_s = timeout_s
    return ctx


def _is_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting ...", NCCL/c10d: "timeout"/
    DistBackendError), or lost its peer while waiting ("Connection closed by peer")."""
    text = str(exc).lower()
    backend_error = getattr(dist, "DistBackendError", None)
    return (isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text
                                               or "connection closed by peer" in text or "connection reset" in text)) \
        or (backend_error is not None and isinstance(exc, backend_error))


def _destroy():
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
