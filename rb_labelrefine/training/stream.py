"""The batch stream: which samples each training step sees, and where its batch is built.

One object answers for the training data of a run:

* **order** -- epoch ``e`` visits the real training set in ``randperm(n)`` drawn from a
  ``torch.Generator`` seeded with ``seed * 100003 + e`` (:class:`EpochSampler`); it depends on
  nothing else, so a resumed run sees the same order.
* **resume** -- ``epoch(e, skip=k)`` starts at global batch ``k`` of that order (the batches a
  checkpoint already did), and the auxiliary stream's position is part of :meth:`state_dict`.
* **auxiliary rows** (``data.aux``) -- every global batch of ``b`` real rows gets
  ``aux_count(b, data.aux_fraction)`` generated rows drawn without replacement from
  :class:`~rb_labelrefine.data.aux.AuxStream`; they follow the real rows in the batch and carry the
  index ``len(train) + archive index``, so per-sample state (SGLR's memory) addresses them after
  the real samples.
* **ranks** (torchrun) -- ``data.batch_size`` stays the global batch.  Every rank computes the
  same global batch (same order, same auxiliary draw: the auxiliary position advances by the
  global count on every rank, so each rank's state equals the checkpoint's) and keeps its slice of
  the real rows and its slice of the auxiliary rows (:func:`slice_bounds`: sizes differ by at most
  one).  The ranks' shares are disjoint and their union is the single-process batch; a rank reads
  only its own auxiliary images.
* **checks** -- per-item batches are validated on their way (:func:`check_batch`); device-resident
  data are validated once, when they are put on the device (nothing can change afterwards).
* **where batches are built** (``data.device_resident``):

  - ``false``: the per-item path -- a ``DataLoader`` (``data.num_workers``) over the data set,
    augmentation per image from torch's global RNG (whose state the checkpoint holds), auxiliary
    images read from the memory map and augmented per image.  Works for any map-style data set.
  - ``true``: the images stay as uint8 (or the data set's float) tensors on the training device --
    the real training rows, and the auxiliary set when it fits there (else its memory map feeds
    each batch) -- and every batch is gathered, padded-cropped and flipped as one tensor on the
    device (:func:`crop_flip`).  The crop offsets and flips of global batch ``k`` of epoch ``e``
    come from a ``torch.Generator`` seeded by ``(seed, e, k)`` alone, so a resumed (or
    distributed) run draws the same augmentation with no generator state to save and no
    DataLoader workers.  Needs a tensor data set (:class:`~rb_labelrefine.data.TensorImageDataset`
    under ``IndexedDataset``/``Subset``) whose augmentation is none or
    :class:`~rb_labelrefine.data.RandomCropFlip`.
  - ``auto`` (default): ``true`` on a CUDA device when the data set allows it and its training
    rows take at most a quarter of the device's free memory; ``false`` otherwise -- in particular
    always on the CPU, so every existing CPU run keeps its numbers bit for bit (the two paths draw
    different augmentations; without augmentation they build identical batches).  A resumed run
    keeps the path its checkpoint was trained with (:meth:`BatchStream.load_state_dict`).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, Subset

from ..errors import BadInputError

__all__ = ["EpochSampler", "ShardedBatchSampler", "slice_bounds", "check_batch", "CheckedLoader", "stack",
           "crop_flip", "resident_source", "resolve_resident", "BatchStream", "build_stream", "first_samples",
           "open_aux_data", "RESIDENT_MODES", "count_steps_per_epoch"]

RESIDENT_MODES = ("auto", "true", "false")
_AUG_TAG = 0x5EED_A06   # separates the augmentation seeds from every other use of train.seed
_AUTO_FRACTION = 0.25   # auto: the resident data take at most this share of the device's free memory


def count_steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of ``n`` samples (``data.drop_last``: full batches only)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch): a resumed run sees the same order,
    and can skip the samples it already did (``skip`` counts samples).  ``limit``: an epoch is
    the head of each permutation (``data.epoch_images``)."""

    def __init__(self, n: int, seed: int, limit: Optional[int] = None):
        self.n, self.seed, self.epoch, self.skip, self.limit = n, seed, 0, 0, limit

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def order(self) -> torch.Tensor:
        """The epoch's whole order (``limit`` applied, ``skip`` not)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g)[:self.limit]

    def __iter__(self):
        return iter(self.order()[self.skip:].tolist())

    def __len__(self):
        return min(self.n, self.limit if self.limit is not None else self.n) - self.skip


def slice_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's share of a batch of ``n`` rows: sizes differ by at most one."""
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


class ShardedBatchSampler(Sampler):
    """This rank's slice of each global batch of an :class:`EpochSampler` (``world_size=1``: the
    whole batch).  ``set_epoch(epoch, skip)`` is forwarded (``skip`` counts samples of the global
    order), so the order, the mid-epoch skip and the step count are those of one process."""

    def __init__(self, base, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if batch_size < world_size:
            raise ValueError(f"the global batch ({batch_size}) is smaller than the number of ranks ({world_size})")
        self.base, self.batch_size, self.rank, self.world_size = base, int(batch_size), int(rank), int(world_size)
        self.drop_last = bool(drop_last)  # data.drop_last: no partial last global batch

    def set_epoch(self, epoch: int, skip: int = 0):
        self.base.set_epoch(epoch, skip)

    slice_bounds = staticmethod(slice_bounds)

    def __iter__(self):
        order = list(iter(self.base))
        for i in range(0, len(order), self.batch_size):
            batch = order[i:i + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            a, b = slice_bounds(len(batch), self.rank, self.world_size)
            yield batch[a:b]

    def __len__(self):
        return count_steps_per_epoch(len(self.base), self.batch_size, self.drop_last)


def check_batch(x, y, idx, num_classes: int, where: str) -> None:
    """``validate_batch`` on every batch, not only the first 8 samples checked at setup: a bad
    label deep in the data otherwise surfaces as an IndexError from the loss, NaN pixels as a
    misleading NonFiniteLossError, and 0-255 pixels or bad validation/test samples not at all.
    One min/max per tensor on the CPU batch -- negligible next to a PGD step.  The message says
    which split and batch, and which dataset indices are at fault (a :class:`BadInputError`: exit 2)."""
    from ..data import validate_batch

    try:
        validate_batch(x, y, num_classes)
    except ValueError as exc:
        at = ""
        if torch.is_tensor(idx) and x.dim() == 4 and y.dim() == 1 and len(x) == len(y) == len(idx):
            flat = x.detach().flatten(1).double()
            bad = ((y < 0) | (y >= num_classes) | ~torch.isfinite(flat).all(1)
                   | (flat < 0).any(1) | (flat > 1).any(1)).cpu()
            if bool(bad.any()):
                at = f" (dataset indices {idx[bad][:5].tolist()}{' ...' if int(bad.sum()) > 5 else ''})"
        raise BadInputError(f"{where}: {exc}{at}") from None


class CheckedLoader:
    """An evaluation loader whose batches are validated on their way to the evaluator."""

    def __init__(self, loader, num_classes: int, split: str):
        self.loader, self.num_classes, self.split = loader, num_classes, split

    @classmethod
    def over(cls, ds, batch_size: int, num_classes: int, split: str) -> "CheckedLoader":
        return cls(DataLoader(ds, batch_size=batch_size), num_classes, split)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            check_batch(batch[0], batch[1], batch[2] if len(batch) > 2 else None, self.num_classes,
                        f"{self.split} data (batch {i + 1})")
            yield batch

    def __len__(self):
        return len(self.loader)


def stack(ds, n: Optional[int] = None):
    """The first ``n`` (all) images and labels of a data set as two tensors."""
    n = len(ds) if n is None else min(n, len(ds))
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        xs.append(item[0])
        ys.append(int(item[1]))
    return torch.stack(xs), torch.tensor(ys)


# ----------------------------------------------------------------------------- batched augmentation

def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: Optional[torch.Tensor],
              padding: int) -> torch.Tensor:
    """:class:`~rb_labelrefine.data.RandomCropFlip` on a whole batch: zero-pad ``x`` [B, C, H, W]
    (any dtype) by ``padding``, crop row ``b`` at ``(top[b], left[b])`` (each in ``[0, 2 padding]``)
    to the original size and mirror it horizontally where ``flip[b]``.  One ``gather`` on the
    batch's device; equal, image by image, to the per-image transform at the same offsets."""
    B, C, H, W = x.shape
    dev = x.device
    top, left = top.to(dev), left.to(dev)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    xp = F.pad(x, (padding,) * 4) if padding else x
    rows = top[:, None] + torch.arange(H, device=dev)
    cols = left[:, None] + torch.arange(W, device=dev)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    return xp.reshape(B, C, Hp * Wp).gather(2, flat).reshape(B, C, H, W)


def _aug_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    mixed = np.random.SeedSequence([_AUG_TAG, int(seed), int(epoch), int(batch)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(mixed[0] >> np.uint64(1)))


def _draw_crop_flip(aug, n: int, g: torch.Generator):
    """Offsets ``[n]``, ``[n]`` and flips ``[n]`` (or None) for ``n`` rows, in this order."""
    p = aug.padding
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if aug.flip else None
    return off[:, 0], off[:, 1], flips


# ----------------------------------------------------------------------------- sources

def resident_source(ds):
    """``(images, labels, rows, transform)`` when ``ds`` is a tensor data set (a
    ``TensorImageDataset``, possibly under ``IndexedDataset`` / ``Subset``): sample ``i`` of ``ds``
    is ``images[rows[i]]``.  ``None`` for any other data set (the per-item path serves it)."""
    from ..data import IndexedDataset, TensorImageDataset

    rows = None
    while True:
        if isinstance(ds, IndexedDataset):
            ds = ds.dataset
        elif isinstance(ds, Subset):
            sub = torch.as_tensor(ds.indices, dtype=torch.long)
            rows = sub if rows is None else sub[rows]
            ds = ds.dataset
        elif isinstance(ds, TensorImageDataset):
            if rows is None:
                rows = torch.arange(len(ds))
            return ds.x, ds.y, rows, ds.transform
        else:
            return None


def _known_augmentation(transform) -> bool:
    from ..data import RandomCropFlip

    return transform is None or type(transform) is RandomCropFlip


def resident_refusal(ds) -> Optional[str]:
    """Why ``ds`` cannot be device-resident (None when it can)."""
    src = resident_source(ds)
    if src is None:
        return (f"the training data set ({type(ds).__name__}) is not a tensor data set (TensorImageDataset); "
                "its batches are built per item")
    if not _known_augmentation(src[3]):
        return (f"its augmentation {src[3]!r} is not RandomCropFlip (the batched crop+flip); a user transform runs "
                "per item")
    return None


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def resolve_resident(setting, ds, device: torch.device, extra_bytes: int = 0) -> bool:
    """``data.device_resident`` (auto | true | false, or a bool) for this data set and device; see
    the module docstring.  ``true`` on a data set that cannot be resident is a ``ConfigError``."""
    from ..config import ConfigError

    setting = {True: "true", False: "false"}.get(setting, setting)
    if setting not in RESIDENT_MODES:
        raise ConfigError("data.device_resident", f"must be auto, true or false, got {setting!r}")
    if setting == "false":
        return False
    why = resident_refusal(ds)
    if setting == "true":
        if why is not None:
            raise ConfigError("data.device_resident", f"true needs a tensor data set with no augmentation or "
                              f"RandomCropFlip: {why}")
        return True
    if why is not None or device.type != "cuda":
        return False
    x, _, rows, _ = resident_source(ds)
    need = len(rows) * x[0].numel() * x.element_size() + extra_bytes
    free = _free_bytes(device)
    return free is not None and need <= _AUTO_FRACTION * free


def first_samples(ds, num_classes: int, n: int = 8):
    """The first ``n`` training samples ``(x, y, idx)``, checked: the data against the model once,
    with clear messages, before hours of training."""
    x0, y0, i0 = next(iter(DataLoader(ds, batch_size=min(n, len(ds)))))
    check_batch(x0, y0, i0, num_classes, "training data (first samples)")
    return x0, y0, i0


def build_stream(cfg, train_ds, num_classes: int, chw: tuple, device, dist=None) -> "BatchStream":
    """The run's :class:`BatchStream` from its config: ``data.*``, ``train.seed``, the device and
    the process group (``dist``: rank / world size when enabled); ``chw`` = the real images' shape,
    which the auxiliary archive must match."""
    from ..data import RandomCropFlip

    d = cfg.data
    aux = None
    if d.aux:   # augmented as the real images (per item: RandomCropFlip from the global RNG)
        aux = open_aux_data(d.aux, num_classes=num_classes, chw=chw,
                            transform=RandomCropFlip(padding=4) if d.augment else None)
    ranks = dict(rank=dist.rank, world_size=dist.world_size) if dist is not None and dist.enabled else {}
    stream = BatchStream(train_ds, num_classes=num_classes, batch_size=d.batch_size, seed=cfg.train.seed,
                         device=device, drop_last=d.drop_last, num_workers=d.num_workers, aux=aux,
                         aux_fraction=d.aux_fraction, aux_batch=d.aux_batch, epoch_images=d.epoch_images,
                         resident=d.device_resident, **ranks)
    if ranks and stream.setting == "auto":   # ranks whose free memory differs must still agree on the path
        somewhere_not = dist.any_true(not stream.resident)   # a collective: every rank calls it
        stream.resident = stream.resident and not somewhere_not
    return stream


def open_aux_data(path, *, num_classes: int, chw: tuple, transform=None):
    """The auxiliary set of ``data.aux`` (memory-mapped; bad files are a ``ConfigError`` naming
    the field)."""
    from ..config import ConfigError
    from ..data import CorruptDatasetError, DatasetNotFoundError
    from ..data.aux import AuxData

    c, h, w = chw
    try:
        return AuxData(path, num_classes=num_classes, image_shape=(h, w, c), transform=transform)
    except (CorruptDatasetError, DatasetNotFoundError) as exc:
        raise ConfigError("data.aux", str(exc)) from None


# ----------------------------------------------------------------------------- the stream

class BatchStream:
    """The training batches of a run: ``for x, y, idx in stream.epoch(e, skip=k)``.

    ``x`` [n, C, H, W] float in [0, 1] and ``y`` [n] int64 are on ``device``; ``idx`` [n] int64
    stays on the CPU (per-sample state checks its range without a device sync): the dataset
    index of each real row, ``len(train) + archive index`` for auxiliary rows.  Under torchrun
    (``world_size > 1``) each rank receives its share of every global batch (module docstring).

    Args:
        train_ds: the training split (map-style, items ``(x, y[, idx])``).
        num_classes, batch_size (``data.batch_size``, global), seed (``train.seed``), device,
        drop_last, num_workers: as in the config.
        aux: an :class:`~rb_labelrefine.data.aux.AuxData` (or None), ``aux_fraction`` and
            ``aux_batch``: ``add`` stacks ``aux_count(b, aux_fraction)`` generated rows under
            ``b = batch_size`` real ones (the ADR code); ``split``: ``batch_size`` is the whole
            batch, ``int(batch_size * aux_fraction)`` of it generated (the SemiSupervisedSampler of
            Carmon / Gowal / Wang et al. 2023).  The auxiliary stream is seeded by ``seed``.
        epoch_images: an epoch is ``ceil(epoch_images / whole batch)`` steps, its real rows the
            head of the epoch's permutation (None: one pass over the real data).
        resident: ``data.device_resident`` (auto | true | false).
        rank, world_size: this process's place in a torchrun job.
    """

    def __init__(self, train_ds, *, num_classes: int, batch_size: int, seed: int, device=None,
                 drop_last: bool = False, num_workers: int = 0, aux=None, aux_fraction: float = 0.0,
                 aux_batch: str = "add", epoch_images: Optional[int] = None, resident="false", rank: int = 0,
                 world_size: int = 1):
        from ..data.aux import AuxStream, aux_count

        self.ds, self.num_classes = train_ds, int(num_classes)
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_workers, self.rank, self.world_size = int(num_workers), int(rank), int(world_size)
        self.n_real = len(train_ds)
        self.aux_fraction, self.aux_batch, self.whole_batch = float(aux_fraction), aux_batch, int(batch_size)
        self.aux = AuxStream(aux, seed) if aux is not None else None
        if self.aux is not None:   # the most generated rows one step draws: bounds a checkpoint's aux position
            self.aux.max_rows_per_step = int(batch_size) + aux_count(int(batch_size), aux_fraction)
        # the real rows of a (global) batch
        self.batch_size = (batch_size - int(batch_size * aux_fraction) if aux_batch == "split" else int(batch_size))
        self.steps_per_epoch = count_steps_per_epoch(self.n_real, self.batch_size, self.drop_last)
        limit = None
        if epoch_images is not None:   # the SemiSupervisedSampler's epoch: ceil(epoch_images / whole batch)
            from ..config import ConfigError

            whole = batch_size if aux_batch == "split" else batch_size + aux_count(batch_size, aux_fraction)
            k = math.ceil(epoch_images / whole)
            if k > self.steps_per_epoch:
                raise ConfigError("data.epoch_images", f"{epoch_images} images make {k} batches of {whole}, more "
                                  f"than one pass over the {self.n_real} real training images gives "
                                  f"({self.steps_per_epoch} of {self.batch_size})")
            self.steps_per_epoch, limit = k, k * self.batch_size
        if self.steps_per_epoch == 0:
            from ..config import ConfigError
            raise ConfigError("data.drop_last", f"{self.n_real} training samples make no full batch of "
                              f"{self.batch_size}: drop_last leaves no training step")
        self.n_epoch = min(self.n_real, limit) if limit is not None else self.n_real   # real rows an epoch visits
        self._check_world()
        self.setting = {True: "true", False: "false"}.get(resident, resident)
        self._aux_bytes = aux.images.nbytes if aux is not None else 0
        self.resident = resolve_resident(resident, train_ds, self.device)
        self.sampler = EpochSampler(self.n_real, self.seed, limit)
        self._loader = None
        self._res = None  # device tensors, built on first use (after a resume chose the path)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Rows per-sample state needs: real samples, then auxiliary ones."""
        return self.n_real + (self.aux.n if self.aux is not None else 0)

    def _check_world(self):
        B, W, n = self.batch_size, self.world_size, self.n_epoch
        if W <= 1:
            return
        last = 0 if self.drop_last else n % B
        if B < W or 0 < last < W:
            from ..config import ConfigError
            raise ConfigError("data.batch_size", f"with {W} ranks every global batch needs at least {W} samples; "
                              f"{n} training samples in batches of {B} leave a last batch of {last or B}. "
                              "Choose another batch size (or data.train_subset).")

    def real_rows(self, step_in_epoch: int) -> int:
        """Real rows of the global batch ``step_in_epoch`` (the last one of an epoch may be short)."""
        return min(self.batch_size, self.n_epoch - step_in_epoch * self.batch_size)

    def aux_rows(self, n_real: int) -> int:
        """Generated rows stacked under ``n_real`` real ones in a global batch."""
        from ..data.aux import aux_count

        if self.aux is None:
            return 0
        return self.whole_batch - n_real if self.aux_batch == "split" else aux_count(n_real, self.aux_fraction)

    def global_batch_size(self, step_in_epoch: int) -> int:
        """Rows (real + auxiliary) of the global batch ``step_in_epoch``."""
        n = self.real_rows(step_in_epoch)
        return n + self.aux_rows(n)

    def rank_sizes(self, step_in_epoch: int) -> list:
        """Rows of every rank's share of global batch ``step_in_epoch``, in rank order."""
        n = self.real_rows(step_in_epoch)
        a = self.aux_rows(n)
        sizes = []
        for r in range(self.world_size):
            (r0, r1), (a0, a1) = slice_bounds(n, r, self.world_size), slice_bounds(a, r, self.world_size)
            sizes.append(r1 - r0 + a1 - a0)
        return sizes

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- state ---------------------------------------------------------------------------------
    # The auxiliary position is ``self.aux``'s own state (``AuxStream.state_dict``: the checkpoint's
    # "aux" entry, as before the stream existed); the stream's is the path batches are built on.
    def state_dict(self) -> dict:
        return {"resident": bool(self.resident)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint from before the stream existed) means
        the per-item path.  With ``data.device_resident=auto`` the checkpoint's path is kept
        (another device may resolve ``auto`` differently; the two paths draw different
        augmentations); an explicit setting that contradicts it is refused."""
        was = bool((state or {}).get("resident", False))
        if was == self.resident:
            return
        if self.setting != "auto":
            raise ValueError(f"data.device_resident={self.setting}, but the checkpoint's batches were built "
                             f"{'on the device' if was else 'per item'}: resume with data.device_resident="
                             f"{'true' if was else 'false'} (or auto)")
        if was:
            resolve_resident("true", self.ds, self.device)   # raises if this data set cannot be resident
        self.resident = was

    # -- batches ---------------------------------------------------------------------------------
    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple]:
        """The batches of ``epoch`` from global batch ``skip`` on."""
        if self.resident:
            return self._resident_epoch(epoch, skip)
        return self._per_item_epoch(epoch, skip)

    def _aux_slice(self, n_real_global: int):
        """The auxiliary archive indices of this rank's share (the position advances globally)."""
        self.aux.data.check(full=False)   # a truncated or rewritten archive: exit 2 naming it, never SIGBUS
        a = self.aux_rows(n_real_global)
        ai = self.aux.next_indices(a)
        lo, hi = slice_bounds(a, self.rank, self.world_size)
        return ai, lo, hi

    # per item: a DataLoader, per-image augmentation from the global RNG (today's numbers)
    def loader(self) -> DataLoader:
        if self._loader is None:
            batches = ShardedBatchSampler(self.sampler, self.batch_size, self.rank, self.world_size,
                                          drop_last=self.drop_last)
            self._loader = DataLoader(self.ds, batch_sampler=batches, num_workers=self.num_workers,
                                      pin_memory=self.device.type == "cuda",
                                      # its own generator: creating an epoch's iterator must not
                                      # draw from the global RNG (bit-exact resume mid-epoch)
                                      generator=torch.Generator().manual_seed(self.seed))
        return self._loader

    def _per_item_epoch(self, epoch: int, skip: int):
        loader = self.loader()
        self.sampler.set_epoch(epoch, skip * self.batch_size)   # the sampler's skip counts samples
        # The generator only seeds DataLoader workers (augmentation in workers); re-seeded per epoch so
        # an epoch's worker seeds do not depend on how many epochs this process has iterated.
        loader.generator.manual_seed(self.seed * 100003 + epoch)
        dev = self.device
        for k, (x, y, idx) in enumerate(loader, start=skip):
            idx = torch.as_tensor(idx)
            if self.aux is not None:
                n_global = self.real_rows(k)
                ai, lo, hi = self._aux_slice(n_global)
                if self.world_size > 1 and _known_augmentation(self.aux.data.transform):
                    # ranks draw no global random numbers for generated rows
                    xa = self._aux_rows_batched(epoch, k, n_global, ai, lo, hi)
                    ya = self.aux.data.labels[torch.from_numpy(ai[lo:hi].astype(np.int64))]
                else:   # one process: per image, from the global RNG (the former numbers)
                    xa, ya = self.aux.data.batch(ai[lo:hi])
                x, y = torch.cat([x, xa]), torch.cat([y, ya])
                idx = torch.cat([idx, torch.from_numpy(ai[lo:hi].astype(np.int64)) + self.n_real])
            check_batch(x, y, idx, self.num_classes, f"training data (epoch {epoch + 1}, batch {k + 1})")
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), idx

    def _aux_rows_batched(self, epoch: int, k: int, n_global: int, ai, lo: int, hi: int) -> torch.Tensor:
        """This rank's generated rows of global batch ``k``, augmented as the device-resident path
        augments them (the draws of rows ``n_global + [lo, hi)`` of the batch's seeded generator).
        Under torchrun per-image augmentation from the global RNG would draw a different amount on
        ranks whose shares differ by one, and the ranks' RNG streams (random starts, evaluation) must
        stay equal: the checkpoint holds rank 0's."""
        raw = self._read_aux(ai[lo:hi])
        aug = self.aux.data.transform
        if aug is not None and (aug.padding or aug.flip):
            top, left, flips = _draw_crop_flip(aug, n_global + len(ai), _aug_generator(self.seed, epoch, k))
            s = n_global + torch.arange(lo, hi)
            raw = crop_flip(raw, top[s], left[s], flips[s] if flips is not None else None, aug.padding)
        return raw.float().div_(255)

    # device-resident: one gather + crop + flip per batch on the device
    def _build_resident(self):
        x, y, rows, transform = resident_source(self.ds)
        dev = self.device
        ys = y.index_select(0, rows)
        # checked once, on their way to the device (nothing changes them afterwards): the labels,
        # and float pixels (uint8 pixels are in range by construction)
        if x.is_floating_point():
            check_batch(x.index_select(0, rows), ys, torch.arange(len(ys)), self.num_classes,
                        "training data (device-resident)")
        _check_labels(ys, self.num_classes)
        aug = transform if transform is not None and (transform.padding or transform.flip) else None
        if dev.type == "cpu":   # already in this memory: rows are gathered through the index map, no copy
            res = {"x": x, "map": rows, "y": ys}
        else:                   # only the training rows go to the device
            res = {"x": x.index_select(0, rows).to(dev), "map": None, "y": ys.to(dev)}
        res.update(aug=aug, aux_x=None)
        if self.aux is not None:
            res["aux_y"] = self.aux.data.labels.to(dev)
            if dev.type == "cuda":   # generated data on the device when they fit, else the memory map feeds them
                free = _free_bytes(dev)
                if free is not None and self._aux_bytes <= _AUTO_FRACTION * free:
                    res["aux_x"] = _load_aux(self.aux.data, dev)
        self._res = res
        return res

    def _resident_epoch(self, epoch: int, skip: int):
        res = self._res or self._build_resident()
        dev, W, B = self.device, self.world_size, self.batch_size
        order = EpochSampler(self.n_real, self.seed, self.sampler.limit)
        order.set_epoch(epoch)
        perm = order.order()
        for k in range(skip, self.steps_per_epoch):
            rows = perm[k * B:(k + 1) * B]
            n = len(rows)
            a, b = slice_bounds(n, self.rank, W)
            local = rows[a:b]
            at = (res["map"][local] if res["map"] is not None else local).to(dev)
            x, y, idx, sel = res["x"].index_select(0, at), res["y"].index_select(0, local.to(dev)), local, \
                torch.arange(a, b)   # sel: this rank's rows among the global batch's (real, then generated)
            n_aux = 0
            if self.aux is not None:
                ai, lo, hi = self._aux_slice(n)
                xa, ya, ia = self._resident_aux(res, ai[lo:hi])
                if x.is_floating_point():   # float real images: generated ones joined as floats in [0, 1]
                    xa = xa.float().div_(255)
                x, y, idx, sel = torch.cat([x, xa]), torch.cat([y, ya]), torch.cat([idx, ia]), \
                    torch.cat([sel, n + torch.arange(lo, hi)])
                n_aux = len(ai)
            if res["aug"] is not None:
                top, left, flips = _draw_crop_flip(res["aug"], n + n_aux, _aug_generator(self.seed, epoch, k))
                x = crop_flip(x, top[sel], left[sel], flips[sel] if flips is not None else None, res["aug"].padding)
            yield (x.float().div_(255) if x.dtype == torch.uint8 else x.float()), y, idx

    def _resident_aux(self, res: dict, ai: np.ndarray):
        """Generated rows ``ai`` (uint8, on the device), their labels and their sample indices."""
        dev = self.device
        mine = torch.from_numpy(ai.astype(np.int64))
        if res["aux_x"] is not None:   # the whole set is on the device
            x = res["aux_x"].index_select(0, mine.to(dev))
        else:                          # read through the memory map, copied asynchronously
            raw = self._read_aux(ai)
            x = (raw.pin_memory() if dev.type == "cuda" else raw).to(dev, non_blocking=True)
        return x, res["aux_y"].index_select(0, mine.to(dev)), mine + self.n_real

    def _read_aux(self, ai: np.ndarray) -> torch.Tensor:
        """Generated images as uint8 [n, C, H, W] on the host (NHWC -> NCHW in numpy: 2-3x faster
        than torch's permute + copy of uint8 here)."""
        return torch.from_numpy(np.ascontiguousarray(self.aux.data.read(ai).transpose(0, 3, 1, 2)))


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = ((y < 0) | (y >= num_classes)).nonzero().squeeze(1)
        raise BadInputError(f"training data (device-resident): labels must be in [0, {num_classes}), got values "
                            f"in [{int(y.min())}, {int(y.max())}] (dataset indices {bad[:5].tolist()}"
                            f"{' ...' if len(bad) > 5 else ''})")


def _load_aux(data, device: torch.device, chunk: int = 65536) -> torch.Tensor:
    """The whole auxiliary image array on ``device`` as uint8 [N, C, H, W], read in chunks."""
    n, h, w, c = data.images.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
    for s in range(0, n, chunk):
        block = torch.from_numpy(np.ascontiguousarray(data.images[s:s + chunk])).permute(0, 3, 1, 2)
        out[s:s + len(block)].copy_(block)
    return out
