"""Peak memory of training on a 1M-image auxiliary set (data.aux): mapped, not loaded.

    python benchmarks/aux_memory.py [--n 1000000] [--batches 200] [--aux-batch 768] [--dir /tmp] [--keep]

Writes an uncompressed ``.npz`` of ``n`` random uint8 32x32x3 images (3.07 GB for 1M, the size of
the public ``cifar10_ddpm.npz`` / DM-Improves-AT ``1m.npz``) without holding it in memory, then,
in a fresh process, opens it as the trainer does and draws ``batches`` augmented batches of
``aux-batch`` images from the stream.  It reports that process's peak resident set (VmHWM) and
its resident memory split into private (RssAnon, also its peak over the draws) and file-backed
(RssFile: pages of the mapped file mapped in -- read, or already in the page cache and mapped
around a read -- which the kernel can drop at any time), and deletes the file unless
``--keep``.  Loading the file with ``np.load`` instead would need the whole 3 GB in private memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

SHAPE = (32, 32, 3)


def write_file(path: Path, n: int, chunk: int = 20000) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, (np.arange(n) % 10).astype(np.int64))
        with zf.open("image.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n,) + SHAPE})
            for start in range(0, n, chunk):
                f.write(rng.integers(0, 256, (min(chunk, n - start),) + SHAPE, dtype=np.uint8).tobytes())


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key + "_MB"] = int(val.split()[0]) / 1024
    return out


def measure(path: str, batches: int, aux_batch: int) -> dict:
    import torch

    from rb_labelrefine.data import RandomCropFlip
    from rb_labelrefine.data.aux import open_aux

    torch.set_num_threads(1)
    before = _status()
    t0 = time.time()
    stream = open_aux(path, seed=0, num_classes=10, image_shape=SHAPE, transform=RandomCropFlip(padding=4))
    opened = _status()
    t_open = time.time() - t0
    t0, peak_anon = time.time(), 0.0
    for _ in range(batches):
        x, y, idx = stream.draw(aux_batch)
        peak_anon = max(peak_anon, _status()["RssAnon_MB"])
    t_draw = (time.time() - t0) / batches
    return {"n": len(stream.data), "file_GB": Path(path).stat().st_size / 1e9, "batches": batches,
            "aux_batch": aux_batch, "open_s": round(t_open, 3), "draw_s_per_batch": round(t_draw, 4),
            "after_imports": before, "after_open": opened, "after_draws": _status(),
            "peak_RssAnon_MB_during_draws": peak_anon,
            "images_type": type(stream.data.images).__name__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--aux-batch", type=int, default=768)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)   # the child process
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches, args.aux_batch)))
        return 0
    path = args.dir / f"aux_memory_{args.n}.npz"
    t0 = time.time()
    write_file(path, args.n)
    t_write = time.time() - t0
    try:
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--batches", str(args.batches),
                              "--aux-batch", str(args.aux_batch)], check=True, capture_output=True, text=True)
        res = json.loads(out.stdout)
        res["write_s"] = round(t_write, 1)
        print(json.dumps(res, indent=1))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
