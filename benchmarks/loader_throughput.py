"""Images per second the training input pipeline delivers: per item vs the batch stream.

    python3 benchmarks/loader_throughput.py --json benchmarks/results/loader_throughput.json

One process, one thread (``torch.set_num_threads(1)``), CIFAR-shaped data: ``--n`` random uint8
images 32 x 32 x 3 with the CIFAR augmentation (pad 4, random crop 32, horizontal flip) as
``build_datasets(augment=True)`` builds it, batches of ``--batch`` rows.  Variants, each
``{"images_per_s": N}`` under ``"variants"``:

* ``per_item``: the per-item path (``data.device_resident=false``): a ``DataLoader``
  (``num_workers=0``) over the data set -- one ``__getitem__`` and one ``RandomCropFlip`` per
  image -- plus the per-batch check, as the trainer iterates it.
* ``stream``: the batch stream with ``data.device_resident=true``: one gather, one batched
  crop+flip and one conversion per batch (rb_labelrefine/training/stream.py).
* ``stream_aux``: the same with 70 % generated rows (``data.aux_fraction=0.7``, real batch
  ``round(0.3 * batch)``) read from an ``.npz`` the script writes in the package's aux format
  (``--aux-n`` images; on the CPU they are read through the memory map, as a large set would be).
* ``per_item_aux``: the per-item path with the same generated rows (for reference).

Rows delivered (real + generated) are counted; each variant runs ``--epochs`` passes, or at least
``--min-seconds``.  ``--device cuda`` measures the stream on a GPU (batches built on the device;
the clock stops after a ``synchronize``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from rb_labelrefine.data import IndexedDataset, RandomCropFlip, TensorImageDataset
from rb_labelrefine.data.aux import AuxData
from rb_labelrefine.training.stream import BatchStream

NUM_CLASSES = 10


def machine(device: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": device}
    if hasattr(os, "getloadavg"):
        info["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def build_data(n: int, aux_n: int, tmp: Path, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    train = IndexedDataset(Subset(TensorImageDataset(x, y, transform=RandomCropFlip(padding=4)), list(range(n))))
    path = tmp / "aux.npz"   # the package's aux format: uncompressed .npz, image uint8 N x H x W x C, label N
    rng = np.random.default_rng(seed + 1)
    np.savez(path, image=rng.integers(0, 256, (aux_n, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, NUM_CLASSES, aux_n).astype(np.int64))
    return train, path


def measure(stream: BatchStream, epochs: int, min_seconds: float, device: torch.device) -> dict:
    rows, batches, epoch = 0, 0, 0
    for _ in zip(range(1), stream.epoch(10_000)):   # warm-up: first-use allocations, resident build
        pass
    t0 = time.perf_counter()
    while epoch < epochs or time.perf_counter() - t0 < min_seconds:
        for x, y, idx in stream.epoch(epoch):
            rows += len(y)
            batches += 1
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": round(rows / dt, 1), "images": rows, "batches": batches, "epochs": epoch,
            "seconds": round(dt, 3)}


def run(args) -> dict:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    res = {"benchmark": "loader_throughput", "machine": machine(args.device),
           "settings": {"n": args.n, "aux_n": args.aux_n, "batch": args.batch, "aux_fraction": args.aux_fraction,
                        "augmentation": "pad 4, random crop 32, horizontal flip", "num_workers": 0,
                        "epochs": args.epochs, "min_seconds": args.min_seconds}, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        train, aux_path = build_data(args.n, args.aux_n, Path(tmp))
        real_with_aux = max(1, round((1 - args.aux_fraction) * args.batch))
        variants = {
            "per_item": dict(resident="false", batch_size=args.batch),
            "stream": dict(resident="true", batch_size=args.batch),
            "stream_aux": dict(resident="true", batch_size=real_with_aux, aux=True),
            "per_item_aux": dict(resident="false", batch_size=real_with_aux, aux=True),
        }
        for name in args.variants:
            v = variants[name]
            aux = AuxData(aux_path, num_classes=NUM_CLASSES, transform=RandomCropFlip(padding=4)) if v.get("aux") \
                else None
            stream = BatchStream(train, num_classes=NUM_CLASSES, batch_size=v["batch_size"], seed=0, device=device,
                                 aux=aux, aux_fraction=args.aux_fraction if aux is not None else 0.0,
                                 resident=v["resident"])
            res["variants"][name] = {**measure(stream, args.epochs, args.min_seconds, device),
                                     "real_batch": v["batch_size"], "resident": stream.resident}
            print(f"{name:>13}: {res['variants'][name]['images_per_s']:>10.0f} images/s", file=sys.stderr)
    var = res["variants"]
    if "per_item" in var:
        res["speedup_vs_per_item"] = {k: round(v["images_per_s"] / var["per_item"]["images_per_s"], 2)
                                      for k, v in var.items() if k != "per_item"}
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the result here")
    ap.add_argument("--n", type=int, default=10_000, help="real training images (default 10,000)")
    ap.add_argument("--aux-n", type=int, default=20_000, help="generated images in the aux file (default 20,000)")
    ap.add_argument("--batch", type=int, default=512, help="rows per batch (default 512)")
    ap.add_argument("--aux-fraction", type=float, default=0.7)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the real data per variant (default 2)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="run each variant at least this long")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="+", default=["per_item", "stream", "stream_aux", "per_item_aux"],
                    choices=["per_item", "stream", "stream_aux", "per_item_aux"])
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v["images_per_s"] for k, v in res["variants"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
