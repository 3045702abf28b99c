#!/usr/bin/env python
"""Throughput of the DM-Improves-AT recipe (Wang et al. 2023) preset on one device.

    python benchmarks/dm_recipe_gpu.py --device cuda --json benchmarks/results/dm_recipe_gpu.json
    python benchmarks/dm_recipe_gpu.py --device cpu --depth 10 --width 1 --batch 16 --steps 2   # smoke test

The unmodified ``cifar10-dmwrn28-10-wang2023`` preset (WRN-28-10 swish, TRADES beta 5 + label
smoothing, PGD-10, Gowal WA, batch 512 of which 70 % generated) with random CIFAR-shaped data
(``--n`` real images) and a random generated-data ``.npz`` (``--aux-n`` images) written to a
temporary folder; ``--depth``/``--width`` shrink the network for a smoke test.  Every variant of
``train.amp`` (none, bf16) x ``train.channels_last`` x ``train.compile`` (``--variants``) trains
``--warmup`` untimed then ``--steps`` timed steps through ``Trainer.train_step`` with the run's batch
stream; reported: images per second (real + generated rows), the median step time and, on CUDA,
the peak memory (``torch.cuda.max_memory_allocated``).  Nothing in the package depends on it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRESET = "cifar10-dmwrn28-10-wang2023"


def write_data(tmp: Path, n: int, aux_n: int, seed: int = 0):
    from rb_labelrefine.data import DataInfo, IndexedDataset, TensorImageDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    rng = np.random.default_rng(seed)
    aux = tmp / "aux.npz"
    np.savez(aux, image=rng.integers(0, 256, (aux_n, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, 10, aux_n).astype(np.int64))
    info = DataInfo(name="cifar10", num_classes=10, channels=3, image_size=32, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2471, 0.2435, 0.2616), source="random (benchmark)")
    ds = IndexedDataset(TensorImageDataset(x, y))
    empty = IndexedDataset(TensorImageDataset(x[:0], y[:0]))
    return (ds, empty, ds, info), aux


def measure(variant: dict, args, datasets, aux: Path, tmp: Path) -> dict:
    from rb_labelrefine.config import apply_overrides, config_from_dict, load_raw
    from rb_labelrefine.training.schedule import lr_at, onecycle_at, set_lr
    from rb_labelrefine.training.trainer import Trainer

    over = [f"data.aux={aux}", f"data.batch_size={args.batch}", f"train.device={args.device}",
            f"data.epoch_images={args.n}", f"train.amp={variant['amp'] or 'null'}",
            f"train.channels_last={str(variant['channels_last']).lower()}",
            f"train.compile={str(variant['compile']).lower()}"]
    if args.depth != 28 or args.width != 10:
        over += ["model.arch=dm_wrn", f"model.kwargs={{depth: {args.depth}, width: {args.width}}}"]
    cfg = config_from_dict(apply_overrides(load_raw(PRESET), over))
    name = "-".join(f"{k}={v}" for k, v in variant.items())
    tr = Trainer(cfg, tmp / name, progress=False, handle_signals=False, datasets=datasets)
    tr._setup()
    tr.global_step = 0   # (fit() sets it; the step loop below is the one the differential tests drive)
    dev = tr.device
    times, rows, epoch, step = [], 0, 0, 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    total = args.warmup + args.steps
    while step < total:
        for b, (x, y, idx) in enumerate(tr.stream.epoch(epoch)):
            if step >= total:
                break
            set_lr(tr.optimizer, lr_at(cfg, epoch, b, tr.steps_per_epoch), onecycle_at(cfg, epoch)[1])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            tr.train_step(x, y, idx, epoch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                rows += len(y)
            step += 1
        epoch += 1
    out = {**variant, "steps": len(times), "images_per_s": round(rows / sum(times), 1),
           "step_ms_median": round(1000 * statistics.median(times), 2)}
    if dev.type == "cuda":
        out["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512, help="the whole batch, 70 %% generated (the preset: 512)")
    p.add_argument("--n", type=int, default=2048, help="random real images (an epoch: n / batch steps)")
    p.add_argument("--aux-n", type=int, default=8192, help="random generated images")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default=None,
                   help="comma list of amp:channels_last:compile, e.g. none:0:0,bf16:1:0 (default: all 8 on CUDA, "
                        "none:0:0 on CPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.variants:
        combos = []
        for v in args.variants.split(","):
            amp, cl, comp = v.split(":")
            combos.append((None if amp == "none" else amp, cl == "1", comp == "1"))
    elif args.device.startswith("cuda"):
        combos = list(itertools.product((None, "bf16"), (False, True), (False, True)))
    else:
        combos = [(None, False, False)]
    records = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        datasets, aux = write_data(tmp, args.n, args.aux_n)
        for amp, cl, comp in combos:
            rec = measure({"amp": amp, "channels_last": cl, "compile": comp}, args, datasets, aux, tmp)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    result = {"preset": PRESET, "device": name, "torch": torch.__version__, "batch": args.batch, "depth": args.depth,
              "width": args.width, "records": records}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
