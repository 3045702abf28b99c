"""The batch stream (rb_labelrefine/training/stream.py): order, resume skip, auxiliary rows and their
indices, ranks, device-resident batches with batched crop+flip, and the ``auto`` rule."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from rb_labelrefine.config import ConfigError
from rb_labelrefine.data import IndexedDataset, RandomCropFlip, TensorImageDataset
from rb_labelrefine.data.aux import AuxData, aux_count
from rb_labelrefine.training.stream import (BatchStream, EpochSampler, ShardedBatchSampler, crop_flip,
                                            resolve_resident, slice_bounds)

C = 10


def _data(n=50, sub=range(5, 46), aug=None, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    y = torch.randint(0, C, (n,), generator=g)
    return IndexedDataset(Subset(TensorImageDataset(x, y, transform=aug), list(sub)))


@pytest.fixture(scope="module")
def aux_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("aux") / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), label=np.arange(30) % C)
    return path


def _stream(ds, resident, aux_path=None, frac=0.5, B=16, aug=None, **kw):
    aux = AuxData(aux_path, num_classes=C, transform=aug) if aux_path else None
    return BatchStream(ds, num_classes=C, batch_size=B, seed=3, aux=aux, aux_fraction=frac if aux else 0.0,
                       resident=resident, **kw)


def _batches(stream, epoch, skip=0):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in stream.epoch(epoch, skip)]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_per_item_path_is_the_trainers_former_dataloader_bit_for_bit(aux_path):
    """Order (seed*100003+epoch), global-RNG augmentation per image, aux rows after real rows."""
    aug = RandomCropFlip(4)
    ds = _data(aug=aug)
    s = _stream(ds, "false", aux_path, aug=aug)
    torch.manual_seed(0)
    got = _batches(s, 0) + _batches(s, 1)
    # the former trainer: DataLoader(sampler=EpochSampler, batch_size) + AuxStream.draw(aux_count(len(y)))
    from rb_labelrefine.data.aux import AuxStream
    sampler = EpochSampler(len(ds), 3)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, generator=torch.Generator().manual_seed(3))
    stream = AuxStream(AuxData(aux_path, num_classes=C, transform=aug), 3)
    torch.manual_seed(0)
    ref = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for x, y, i in loader:
            xa, ya, ia = stream.draw(aux_count(len(y), 0.5))
            ref.append((torch.cat([x, xa]), torch.cat([y, ya]), torch.cat([i, ia + len(ds)])))
    _same(got, ref)
    assert s.aux.state_dict() == stream.state_dict() and s.state_dict() == {"resident": False}


def test_device_resident_without_augmentation_builds_the_per_item_batches(aux_path):
    for dtype in (torch.uint8, torch.float32):
        ds = _data(dtype=dtype)
        a, b = _stream(ds, "false", aux_path), _stream(ds, "true", aux_path)
        for epoch in (0, 1):
            _same(_batches(a, epoch), _batches(b, epoch))
        assert b.resident and a.aux.state_dict() == b.aux.state_dict()


def test_crop_flip_equals_the_per_image_transform_at_the_same_offsets():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 3, 7, 9), dtype=torch.uint8, generator=g)
    top, left = torch.randint(0, 9, (12,), generator=g), torch.randint(0, 9, (12,), generator=g)
    flip = torch.rand(12, generator=g) < 0.5
    out = crop_flip(x, top, left, flip, 4)
    xp = F.pad(x.float() / 255, (4, 4, 4, 4))
    for b in range(12):   # RandomCropFlip: pad, crop at (i, j), then mirror
        ref = xp[b, :, top[b]:top[b] + 7, left[b]:left[b] + 9]
        ref = ref.flip(-1) if flip[b] else ref
        assert torch.equal(out[b].float() / 255, ref)
    assert torch.equal(crop_flip(x, torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.long), None, 0), x)


def test_resident_augmentation_is_seeded_by_epoch_and_batch_so_a_resume_is_bit_exact(aux_path):
    aug = RandomCropFlip(4)
    ds = _data(aug=aug)
    full = _stream(ds, "true", aux_path, aug=aug)
    ref = _batches(full, 0) + _batches(full, 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(_batches(_stream(ds, "false", aux_path), 0), ref))
    # stopped after batch 1 of epoch 1: a fresh stream restored from the state at that point
    part = _stream(ds, "true", aux_path, aug=aug)
    first = _batches(part, 0) + [tuple(t.clone() for t in next(iter(part.epoch(1))))]
    state = part.aux.state_dict()
    torch.manual_seed(123)   # the global RNG plays no part in the resident path
    resumed = _stream(ds, "true", aux_path, aug=aug)
    resumed.aux.load_state_dict(state)
    _same(first + _batches(resumed, 1, skip=1), ref)
    # the same rows as without augmentation, cropped and flipped (real and generated rows alike)
    x, y, idx = ref[0]
    plain = _batches(_stream(_data(), "true", aux_path), 0)[0]
    assert x.shape == (16 + aux_count(16, 0.5), 3, 8, 8) and torch.equal(plain[2], idx)
    changed = (x != plain[0]).flatten(1).any(1)
    assert bool(changed[:16].any()) and bool(changed[16:].any())


@pytest.mark.parametrize("resident", ["false", "true"])
@pytest.mark.parametrize("W", [2, 3])
def test_ranks_take_disjoint_shares_whose_union_is_the_single_process_batch(aux_path, resident, W):
    aug = RandomCropFlip(4) if resident == "true" else None   # per item: the global RNG is per rank
    ds = _data(aug=aug)
    one = _batches(_stream(ds, resident, aux_path, aug=aug), 1)
    ranks = [_stream(ds, resident, aux_path, aug=aug, rank=r, world_size=W) for r in range(W)]
    per_rank = [_batches(s, 1) for s in ranks]
    n_real = len(ds)
    for k, (x, y, idx) in enumerate(one):
        shares = [p[k] for p in per_rank]
        assert [len(s[2]) for s in shares] == ranks[0].rank_sizes(k) and sum(ranks[0].rank_sizes(k)) == len(idx)
        assert ranks[0].global_batch_size(k) == len(idx)
        # rank r holds rows [a, b) of the real part and [lo, hi) of the generated part of the global
        # batch: the same samples, the same pixels (augmentation drawn for the global batch)
        n = int((idx < n_real).sum())
        assert bool((idx[:n] < n_real).all()) and bool((idx[n:] >= n_real).all())
        for r, s in enumerate(shares):
            (a, b), (lo, hi) = slice_bounds(n, r, W), slice_bounds(len(idx) - n, r, W)
            at = torch.cat([torch.arange(a, b), n + torch.arange(lo, hi)])
            assert torch.equal(s[2], idx[at]) and torch.equal(s[1], y[at]) and torch.equal(s[0], x[at])
        real = torch.cat([s[2][s[2] < n_real] for s in shares])
        assert len(set(real.tolist())) == len(real) == n                  # disjoint real shares
    assert all(s.aux.state_dict() == ranks[0].aux.state_dict() for s in ranks)   # the aux position is global


def test_per_item_ranks_augment_generated_rows_from_the_batch_seed_not_the_global_rng(aux_path):
    """Under torchrun the per-item path augments generated rows as the resident path does (shares of
    5 and 4 rows would otherwise draw different amounts from the ranks' one RNG stream)."""
    aug = RandomCropFlip(4)
    ds = _data(sub=range(5, 41), aug=aug)   # 36 real rows: 16 + 16 + 4, shared 8/8, 8/8, 2/2 by two ranks
    resident = _batches(_stream(ds, "true", aux_path, aug=aug, frac=0.3), 0)
    n_real = len(ds)
    states = []
    for r in (0, 1):
        torch.manual_seed(0)
        s = _stream(ds, "false", aux_path, aug=aug, frac=0.3, rank=r, world_size=2)
        for k, (x, y, idx) in enumerate(s.epoch(0)):
            gen = idx >= n_real
            ref_x, _, ref_i = resident[k]
            n = int((ref_i < n_real).sum())
            lo, hi = slice_bounds(len(ref_i) - n, r, 2)
            assert torch.equal(idx[gen], ref_i[n + lo:n + hi]) and torch.equal(x[gen], ref_x[n + lo:n + hi])
        states.append(torch.get_rng_state())
    assert [len(b[2]) - int((b[2] < n_real).sum()) for b in resident] == [7, 7, 2]   # 4+3, 4+3, 1+1 per rank
    assert torch.equal(states[0], states[1])   # equal real shares: equal draws, whatever the generated shares


def test_sharded_batches_and_sizes_with_an_uneven_and_a_dropped_last_batch():
    for drop in (False, True):
        base = ShardedBatchSampler(EpochSampler(41, 3), 16, drop_last=drop)
        base.set_epoch(2, 16)
        assert [len(b) for b in base] == ([16] if drop else [16, 9]) and len(base) == (1 if drop else 2)
    assert [slice_bounds(9, r, 2) for r in (0, 1)] == [(0, 5), (5, 9)]
    s = _stream(_data(), "true", B=16, drop_last=True)
    assert s.steps_per_epoch == 2 and all(len(b[2]) == 16 for b in _batches(s, 0))
    with pytest.raises(ConfigError, match="data.batch_size.*3 ranks"):
        _stream(_data(sub=range(0, 17)), "true", B=16, rank=0, world_size=3)   # a last batch of 1 row


class _Items(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 4, 4), i / self.n), i % C, i


def test_auto_keeps_the_per_item_path_on_the_cpu_and_true_needs_a_tensor_set():
    cpu = torch.device("cpu")
    assert resolve_resident("auto", _data(aug=RandomCropFlip(4)), cpu) is False       # CPU: today's numbers
    assert resolve_resident("true", _data(aug=RandomCropFlip(4)), cpu) is True
    assert resolve_resident("auto", _Items(8), cpu) is False
    with pytest.raises(ConfigError, match="data.device_resident.*_Items.*not a tensor data set"):
        resolve_resident("true", _Items(8), cpu)
    with pytest.raises(ConfigError, match="data.device_resident.*not RandomCropFlip"):
        resolve_resident("true", _data(aug=lambda t: t), cpu)
    with pytest.raises(ConfigError, match="data.device_resident.*auto, true or false"):
        resolve_resident("yes", _data(), cpu)
    # a user data set that is not a tensor set keeps the per-item path and its checks
    s = BatchStream(_Items(10), num_classes=C, batch_size=4, seed=0, resident="auto")
    assert not s.resident and [len(b[2]) for b in _batches(s, 0)] == [4, 4, 2]


def test_resume_keeps_the_checkpoints_path_under_auto_and_refuses_a_contradiction(aux_path):
    ds = _data(aug=RandomCropFlip(4))
    s = _stream(ds, "auto", aux_path)
    assert not s.resident
    s.load_state_dict({"resident": True})   # trained on a GPU, resumed on the CPU
    assert s.resident and s.state_dict() == {"resident": True}
    old = _stream(ds, "auto", aux_path)
    old.load_state_dict(None)               # a checkpoint from before the stream: per item
    assert not old.resident
    with pytest.raises(ValueError, match="data.device_resident=true.*per item.*data.device_resident=false"):
        _stream(ds, "true", aux_path).load_state_dict(None)
    with pytest.raises(ConfigError, match="data.device_resident.*not a tensor data set"):
        BatchStream(_Items(10), num_classes=C, batch_size=4, seed=0, resident="auto").load_state_dict(
            {"resident": True})


def test_resident_data_are_checked_once_naming_the_dataset_indices():
    ds = _data()
    ds.dataset.dataset.y[7] = C          # row 7 of the base = sample 2 of the subset (which starts at 5)
    with pytest.raises(ValueError, match=r"training data \(device-resident\): labels must be in \[0, 10\).*"
                                         r"dataset indices \[2\]"):
        next(iter(_stream(ds, "true").epoch(0)))
    f = _data(dtype=torch.float32)
    f.dataset.dataset.x[9, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"device-resident\): inputs contain NaN.*dataset indices \[4\]"):
        next(iter(_stream(f, "true").epoch(0)))


def test_loader_throughput_benchmark_writes_its_json(tmp_path):
    """benchmarks/loader_throughput.py on tiny sizes: the JSON shape the README documents (no timings asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "lt.json"
    cmd = [sys.executable, str(root / "benchmarks" / "loader_throughput.py"), "--json", str(out), "--n", "64",
           "--aux-n", "40", "--batch", "16", "--epochs", "1", "--min-seconds", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"per_item", "stream", "stream_aux", "per_item_aux"}
    for name, v in res["variants"].items():
        assert v["images_per_s"] > 0 and v["images"] >= 64, name
        assert v["resident"] == name.startswith("stream")
    assert res["variants"]["stream_aux"]["real_batch"] == round(0.3 * 16)
    assert res["machine"]["threads"] == 1 and res["machine"]["cpu_count"] >= 1
    assert set(res["speedup_vs_per_item"]) == {"stream", "stream_aux", "per_item_aux"}


def test_split_batches_and_epoch_images_take_the_head_of_each_permutation(aux_path):
    """data.aux_batch=split: batch_size is the whole batch; data.epoch_images: fewer steps, real rows the
    head of the epoch's permutation -- the same on both paths and shared out over ranks."""
    ds = _data()
    kw = dict(frac=0.5, B=16, aux_batch="split", epoch_images=40)
    a, b = _stream(ds, "false", aux_path, **kw), _stream(ds, "true", aux_path, **kw)
    assert a.batch_size == 8 and a.steps_per_epoch == 3 == len(a)   # ceil(40 / 16) batches of 8 + 8
    got = _batches(a, 2)
    _same(got, _batches(b, 2))
    order = EpochSampler(len(ds), 3)
    order.set_epoch(2)
    assert torch.equal(torch.cat([i[:8] for _, _, i in got]), order.order()[:24])
    assert all(len(i) == 16 and bool((i[8:] >= len(ds)).all()) for _, _, i in got)
    ranks = [_stream(ds, "true", aux_path, rank=r, world_size=2, **kw) for r in (0, 1)]
    assert [len(i) for s in ranks for _, _, i in _batches(s, 2)] == [8] * 6 and ranks[0].rank_sizes(0) == [8, 8]
    with pytest.raises(ConfigError, match="data.epoch_images.*100 images make 7 batches of 16"):
        _stream(ds, "false", aux_path, **{**kw, "epoch_images": 100})


def test_a_device_resident_run_with_aux_and_augmentation_resumes_bit_exactly(tmp_path, monkeypatch):
    """The trainer on the resident path (SGLR: per-sample memory over real + generated rows): a
    SIGTERM-style stop mid-epoch, then --resume, equals the uninterrupted run; the checkpoint says
    which path built the batches."""
    import signal

    from _extras import need
    need("sklearn", "torchattacks")
    from rb_labelrefine.config import load_config
    from rb_labelrefine.runs import RUN_FILES, read_weights
    from rb_labelrefine.training.io import safe_torch_load
    from rb_labelrefine.training.trainer import Trainer, TrainingInterrupted

    gen = tmp_path / "gen.npz"
    rng = np.random.default_rng(0)
    np.savez(gen, image=rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8), label=rng.integers(0, 10, 60))
    cfg = load_config("digits-sglr", ["model.arch=mlp", "data.train_subset=96", "data.batch_size=32",
                                      "attack.steps=1", "train.epochs=2", "train.device=cpu", "train.threads=1",
                                      "eval.val_attack_steps=1", "eval.test_attack_steps=1", "eval.curve_test_size=32",
                                      "data.augment=true", "data.device_resident=true", f"data.aux={gen}",
                                      "data.aux_fraction=0.5", "eval.autoattack=false"])
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    orig = Trainer.train_step

    def train_step(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == 4:   # epoch 2, batch 1 of 3
            self.stop.request(signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", orig)
    ck = safe_torch_load(tmp_path / "run" / RUN_FILES["checkpoint"])
    assert (ck["epoch"], ck["batch"]) == (1, 1) and ck["stream"] == {"resident": True}
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    for which in ("final", "best"):
        a, _ = read_weights(tmp_path / "run" / RUN_FILES[which])
        b, _ = read_weights(tmp_path / "ref" / RUN_FILES[which])
        assert all(torch.equal(a[k], b[k]) for k in a), which
    ca, cb = (safe_torch_load(tmp_path / d / RUN_FILES["checkpoint"]) for d in ("run", "ref"))
    assert ca["aux"] == cb["aux"] and torch.equal(ca["rectifier"]["memory"], cb["rectifier"]["memory"])


def test_a_checkpoint_from_before_the_stream_resumes_on_the_per_item_path(tmp_path, monkeypatch):
    import signal

    from _extras import need
    need("sklearn", "torchattacks")
    from rb_labelrefine.config import load_config
    from rb_labelrefine.runs import RUN_FILES
    from rb_labelrefine.training.io import safe_torch_load
    from rb_labelrefine.training.trainer import Trainer, TrainingInterrupted

    cfg = load_config("digits-pgdat", ["model.arch=mlp", "data.train_subset=64", "data.batch_size=32",
                                       "attack.steps=1", "train.epochs=2", "train.device=cpu", "train.threads=1",
                                       "eval.val_attack_steps=1", "eval.test_attack_steps=1",
                                       "eval.curve_test_size=32", "eval.autoattack=false", "data.augment=true"])
    orig = Trainer.train_step

    def train_step(self, *a, **k):
        out = orig(self, *a, **k)
        if self.global_step == 1:
            self.stop.request(signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", orig)
    path = tmp_path / "run" / RUN_FILES["checkpoint"]
    ck = safe_torch_load(path)
    assert ck.pop("stream") == {"resident": False}   # auto on the CPU: per item
    torch.save(ck, path)                              # as written before the stream existed
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    assert safe_torch_load(path)["stream"] == {"resident": False}
