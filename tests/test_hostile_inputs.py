"""Hostile inputs (issue 24): a downloaded run, data file, config or JSON result can neither write
where it should not, nor exhaust memory, nor hang; every bad input is exit 2 naming the field or file.

The table runs each case in a forked child (the parent has imported torch once): the child runs the
command line (``cli.main``) or a data loader (its error mapped to an exit code as the CLI maps it),
under an alarm that turns a hang into a failure.  For each case the test asserts the exit code, the
named field/path in the message, no traceback, no file changed anywhere under the test's folder
(a before/after hash of the tree, links and FIFOs recorded, never opened), and the child's peak
resident memory from ``wait4``: below 1 GiB, or -- where the forked parent itself is large -- less
than 512 MiB above the parent's resident size at the fork (the child shares the parent's pages).
"""
import hashlib
import io
import json
import os
import pickle
import signal
import stat
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rb_labelrefine import cli
from rb_labelrefine.config import Config, dump_config
from rb_labelrefine.models import build_model
from rb_labelrefine.runs import write_weights

GiB, MiB = 1 << 30, 1 << 20
SMALL = {"num_classes": 10, "channels": 3, "image_size": 8, "name": "synthetic",
         "mean": [0.5, 0.5, 0.5], "std": [0.22, 0.22, 0.22], "source": "test"}
CASE_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- helpers

def _tree(root: Path) -> dict:
    """Every path under ``root`` with what it is (links and special files are never opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                out[str(p)] = "dir"
            else:
                out[str(p)] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _as_exit_code(fn) -> int:
    """Run ``fn``; an exception becomes the exit code and message the command line gives it."""
    try:
        fn()
        return 0
    except BaseException as exc:  # noqa: BLE001
        code, message = cli._classify(exc)
        print(f"rb-labelrefine: error: {message}", file=sys.stderr)
        return code


def run_child(fn, tmp_path: Path) -> tuple:
    """``(exit code, stderr, peak RSS bytes, parent RSS bytes)`` of ``fn()`` in a forked child."""
    err_path = tmp_path.parent / f"{tmp_path.name}.stderr"
    base = _rss_bytes()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            sys.stdout = open(os.devnull, "w")
            signal.alarm(CASE_TIMEOUT_S)
            code = fn()
        except BaseException:  # noqa: BLE001 - a traceback here is a failure the parent reports
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 70)
    _, status, usage = os.wait4(pid, 0)
    err = err_path.read_text(errors="replace")
    err_path.unlink()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise AssertionError(f"the child died by signal {sig}" + (" (hung: alarm)" if sig == signal.SIGALRM else "")
                             + f"; stderr: {err[-2000:]}")
    return os.WEXITSTATUS(status), err, usage.ru_maxrss * 1024, base


def make_run(run: Path, state_edit=None, config_text=None) -> Path:
    """A tiny run directory in the trainer's layout (config.yaml, best/final weights)."""
    run.mkdir(parents=True)
    cfg = Config()
    cfg.data.name, cfg.model.arch = "synthetic", "mlp"
    (run / "config.yaml").write_text(config_text if config_text is not None else dump_config(cfg))
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=3, image_size=8, mean=SMALL["mean"], std=SMALL["std"])
    if state_edit is not None:
        with torch.no_grad():
            state_edit(model)
    md = {"arch": "mlp", "epoch": 3, "data_info": json.dumps(SMALL)}
    for which in ("best", "final"):
        write_weights(model, run / f"{which}.safetensors", md)
    return run


def _cast_first(dtype):
    """A state edit: the first weight tensor stored as ``dtype`` (safetensors keeps the dtype)."""
    def edit(model):
        name, p = next(iter(model.named_parameters()))
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        delattr(parent, leaf)
        parent.register_buffer(leaf, p.detach().to(dtype))
    return edit


def _nan_first(model):
    next(iter(model.parameters())).view(-1)[3] = float("nan")


def _write(t: Path, name: str, text) -> Path:
    p = t / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _fifo(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)
    return p


def _config(t: Path, body: str, name="c.yaml") -> Path:
    return _write(t, name, "base: digits-adr\n" + body)


def _anchor_bomb(levels=9, width=9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "model:\n  arch: small_cnn\n  kwargs:\n" + "".join(f"    {ln}\n" for ln in lines)


def _eval_json(t: Path, name="res.json", **over) -> Path:
    aa = {"robust_acc": 40.0, "clean_acc": 80.0, "n": 10, "eps": 8 / 255, "norm": "Linf", "standard": True}
    data = {"which": "best", "norm": "Linf", "eps": 8 / 255, "autoattack": aa}
    for k, v in over.items():
        if k.startswith("aa_"):
            if v is KeyError:
                aa.pop(k[3:], None)
                data.pop(k[3:], None)
            else:
                aa[k[3:]] = v
        else:
            data[k] = v
    return _write(t, name, json.dumps(data))


# --- CIFAR pickles

class _ZeroStrides:
    def __reduce__(self):
        return (np.ndarray, ((349525, 3072), "u1", b"\0", 0, (0, 0)))


def _cifar_root(t: Path, make_batch) -> Path:
    root = t / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / f).write_bytes(make_batch())
    return t


def _memo_bomb_labels() -> bytes:
    """A pickle of {b'data': 2 images, b'labels': L30}, L0 = [1], Lk = [Lk-1, Lk-1]: a few hundred
    bytes (the pickler's memo shares each level) that expand to 2^30 entries unless the sharing is
    kept."""
    level = [1]
    for _ in range(30):
        level = [level, level]
    out = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": level}, protocol=2)
    assert len(out) - 2 * 3072 < 1000    # the images' bytes, then ~500 bytes of lists
    return out


def _encode_bomb() -> bytes:
    """Protocol 2 writes bytes as _codecs.encode(text, 'latin1'): one 100 KB text, memo-shared,
    encoded 20,000 times in 300 KB (2 GB of bytes if every call made its copy)."""
    text = "x" * 100_000
    out = (b"\x80\x02c_codecs\nencode\nq\x00X" + len(text).to_bytes(4, "little") + text.encode()
           + b"q\x01X\x06\x00\x00\x00latin1q\x02(")
    return out + b"h\x00h\x01h\x02\x86R" * 20_000 + b"l."


def _deep_pickle() -> bytes:
    return b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."


def _idx_bomb(t: Path):
    """A 2 KB gzip of 1 MB that the reader, its cap lowered to 64 KB for the test, must refuse
    without decompressing it all."""
    import gzip

    path = _write(t, "labels.gz", gzip.compress(struct.pack(">II", 0x801, 1 << 20) + bytes(1 << 20)))

    def child():
        from rb_labelrefine.data import idx

        idx.MAX_IDX_BYTES = 1 << 16
        return _as_exit_code(lambda: idx.read_idx(path))
    return child


def _load_cifar(root):
    from rb_labelrefine.data import load_cifar

    return lambda: _as_exit_code(lambda: load_cifar(root, "cifar10"))


# --- aux archives

def _npy(arr, version=(1, 0), shape=None) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, arr, version=version)
    raw = bytearray(b.getvalue())
    if shape is not None:
        hlen = struct.unpack("<H", raw[8:10])[0]
        header = raw[10:10 + hlen].decode("latin1").replace(str(arr.shape), str(shape)).rstrip()
        raw[10:10 + hlen] = (header.ljust(hlen - 1) + "\n").encode("latin1")[-hlen:] if len(header) < hlen else \
            (header[:hlen - 1] + "\n").encode("latin1")
    return bytes(raw)


def _zip(path: Path, members, deflate=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name), data,
                       compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return path


IMG, LAB = np.zeros((150, 8, 8, 3), np.uint8), np.zeros(150, np.int64)


def _aux(t: Path, image=None, label=None, extra=(), deflate=()) -> Path:
    return _zip(t / "aux.npz", [("image.npy", image if image is not None else _npy(IMG)),
                                ("label.npy", label if label is not None else _npy(LAB)), *extra], deflate)


def _aux_deflated_label_bomb(t: Path) -> Path:
    """The label member deflate-compressed: 3e8 zero bytes (uint8 labels) in ~300 KB."""
    n = 300_000_000
    header = _npy(np.zeros(1, np.uint8), shape=(n,))
    header = header[:len(header) - 1]                     # drop the one data byte
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunks = [comp.compress(header)]
    block = bytes(1 << 22)
    for _ in range(n // len(block)):
        chunks.append(comp.compress(block))
    chunks.append(comp.compress(bytes(n % len(block))))
    chunks.append(comp.flush())
    raw = b"".join(chunks)
    # a stored image member of n images would be n*192 bytes: the label member is read first
    path = t / "aux.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("image.npy"), _npy(IMG))
    # append a deflated member whose compressed bytes we computed ourselves (zipfile would need the data)
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo("label.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:     # streamed: never holds 3e8 bytes
            d = zlib.decompressobj(-15)
            for i in range(0, len(raw), 1 << 20):
                f.write(d.decompress(raw[i:i + (1 << 20)]))
            f.write(d.flush())
    return path


def _aux_data(path, **kw):
    from rb_labelrefine.data.aux import AuxData

    return lambda: _as_exit_code(lambda: AuxData(path, num_classes=10, **kw))


# ----------------------------------------------------------------------------- the table
# name -> (setup(t) -> callable run in the child, or argv list for cli.main; exit code; substrings)

def _cli(argv_fn):
    return lambda t: (lambda argv=[str(a) for a in argv_fn(t)]: cli.main(argv))


CASES = {
    # YAML: aliases, duplicates, depth, sizes, special files
    "yaml anchor bomb": (_cli(lambda t: ["configs", "--show", _config(t, _anchor_bomb())]), 2,
                         ["c.yaml", "expands to more than"]),
    "yaml duplicate key": (_cli(lambda t: ["configs", "--show", _config(t, "attack:\n  eps: 0.1\n  eps: 0.3\n")]), 2,
                           ["c.yaml", "duplicate key 'eps'"]),
    "yaml 20000 nested lists": (_cli(lambda t: ["configs", "--show", _config(t, "x: " + "[" * 20000 + "]" * 20000)]),
                                2, ["c.yaml", "nested more than"]),
    "yaml 3000 nested maps": (_cli(lambda t: ["configs", "--show", _config(t, "x: " + "{a: " * 3000 + "1" + "}" * 3000)]),
                              2, ["c.yaml", "nested more than"]),
    "yaml base /dev/zero": (_cli(lambda t: ["configs", "--show", _write(t, "c.yaml", "base: /dev/zero\n")]), 2,
                            ["/dev/zero", "not a regular file"]),
    "yaml FIFO config": (_cli(lambda t: ["configs", "--show", _fifo(t / "f.yaml")]), 2, ["f.yaml", "FIFO"]),
    "yaml 5000-digit integer": (_cli(lambda t: ["configs", "--show", _config(t, "train:\n  seed: " + "9" * 5000 + "\n")]),
                                2, ["c.yaml", "4300 digits"]),
    "train.seed -1": (_cli(lambda t: ["configs", "--show", _config(t, "train:\n  seed: -1\n")]), 2, ["train.seed"]),
    "train.seed 1e30": (_cli(lambda t: ["configs", "--show", _config(t, "train:\n  seed: 1.0e+30\n")]), 2,
                        ["train.seed"]),
    "data.batch_size 1e30": (_cli(lambda t: ["configs", "--show", _config(t, "data:\n  batch_size: 1.0e+30\n")]), 2,
                             ["data.batch_size"]),
    "train.threads 1e30": (_cli(lambda t: ["configs", "--show", _config(t, "train:\n  threads: 1.0e+30\n")]), 2,
                           ["train.threads"]),
    "--set 5000-digit seed": (_cli(lambda t: ["train", "--config", "digits-adr", "--out", t / "never",
                                               "--set", "train.seed=" + "9" * 5000]), 2, ["train.seed"]),
    # a run directory from elsewhere
    "run config.yaml -> /dev/zero": (_cli(lambda t: [
        "export", "--checkpoint", _relink(make_run(t / "run"), "config.yaml", "/dev/zero"), "--out", t / "exp"]), 2,
        ["config.yaml", "symbolic link"]),
    "run config.yaml -> victim": (_cli(lambda t: [
        "export", "--checkpoint", _relink(make_run(t / "run"), "config.yaml", _write(t, "victim.txt", "secret\n")),
        "--out", t / "exp"]), 2, ["config.yaml", "symbolic link"]),
    "run config.yaml FIFO": (_cli(lambda t: [
        "export", "--checkpoint", _refifo(make_run(t / "run"), "config.yaml"), "--out", t / "exp"]), 2,
        ["config.yaml", "FIFO"]),
    "run best.safetensors FIFO (export)": (_cli(lambda t: [
        "export", "--checkpoint", _refifo(make_run(t / "run"), "best.safetensors"), "--out", t / "exp"]), 2,
        ["best.safetensors", "FIFO"]),
    "run best.safetensors FIFO (eval)": (_cli(lambda t: [
        "eval", "--checkpoint", _refifo(make_run(t / "run"), "best.safetensors"), "--n", "2"]), 2,
        ["best.safetensors", "FIFO"]),
    "run best.safetensors -> another file": (_cli(lambda t: [
        "export", "--checkpoint", _relink(make_run(t / "run"), "best.safetensors",
                                          make_run(t / "elsewhere") / "final.safetensors"), "--out", t / "exp"]), 2,
        ["best.safetensors", "symbolic link"]),
    "run config.yaml anchor bomb": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run", config_text=_anchor_bomb()), "--out", t / "exp"]), 2,
        ["config.yaml", "expands to more than"]),
    "NaN weight (export)": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run", _nan_first), "--out",
                                            t / "exp"]), 2, ["best.safetensors", "non-finite", "model.1.weight"]),
    "NaN weight (eval)": (_cli(lambda t: ["eval", "--checkpoint", make_run(t / "run", _nan_first), "--n", "2"]), 2,
                          ["best.safetensors", "non-finite"]),
    "int8 weight": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run", _cast_first(torch.int8)), "--out",
                                    t / "exp"]), 2, ["best.safetensors", "int8", "not floating point"]),
    "bool weight": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run", _cast_first(torch.bool)), "--out",
                                    t / "exp"]), 2, ["best.safetensors", "bool"]),
    "complex weight": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run", _cast_first(torch.complex64)),
                                       "--out", t / "exp"]), 2, ["best.safetensors", "complex64"]),
    "--overwrite onto a thesis with a copied export.json": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run"), "--out", _thesis(t), "--overwrite"]), 2,
        ["thesis.tex", "not part of the export"]),
    # JSON inputs
    "--results without eps": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run"), "--out", t / "exp",
                                              "--results", _eval_json(t, aa_eps=KeyError)]), 2,
                              ["res.json", "autoattack.eps is missing"]),
    "--results sanity a list": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run"), "--out", t / "exp",
                                                "--results", _eval_json(t, sanity=[1, 2])]), 2,
                                ["res.json", "sanity must be a JSON object"]),
    "--results sanity without checks": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run"), "--out", t / "exp", "--results",
        _eval_json(t, sanity={"norm": "Linf", "eps": 0.03, "n": 10, "clean_acc": 50, "passed": True})]), 2,
        ["res.json", "sanity.checks must be a JSON object"]),
    "--results sanity check missing": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run"), "--out", t / "exp", "--results",
        _eval_json(t, sanity={"norm": "Linf", "eps": 0.03, "n": 10, "clean_acc": 50, "passed": True,
                              "checks": {"eps_sweep": {}}})]), 2, ["res.json", "sanity.checks.eps_sweep.passed"]),
    "--results sanity acc not numbers": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run"), "--out", t / "exp", "--results",
        _eval_json(t, sanity={"norm": "Linf", "eps": 0.03, "n": 10, "clean_acc": 50, "passed": True, "checks": {
            "eps_sweep": {"passed": True, "reason": "", "steps": 20, "eps": [0.1], "acc": ["x"]}}})]), 2,
        ["res.json", "sanity.checks.eps_sweep.acc"]),
    "--results nested 10000 deep": (_cli(lambda t: [
        "export", "--checkpoint", make_run(t / "run"), "--out", t / "exp", "--results",
        _write(t, "res.json", '{"autoattack": ' + "[" * 10000 + "]" * 10000 + "}")]), 2, ["res.json", "nested"]),
    "--results FIFO": (_cli(lambda t: ["export", "--checkpoint", make_run(t / "run"), "--out", t / "exp",
                                       "--results", _fifo(t / "res.json")]), 2, ["res.json", "FIFO"]),
    "leaderboard --n 0": (_cli(lambda t: ["leaderboard", "--autoattack", "50", "--n", "0"]), 2, ["--n"]),
    "leaderboard --n -3": (_cli(lambda t: ["leaderboard", "--autoattack", "50", "--n", "-3"]), 2, ["--n"]),
    'leaderboard "n": 0': (_cli(lambda t: ["leaderboard", "--model-info", _write(t, "mi.json", '{"autoattack_acc": 50, "n": 0}')]),
                           2, ["mi.json", "n must be an integer"]),
    'leaderboard "n": 1e999': (_cli(lambda t: ["leaderboard", "--model-info",
                                               _write(t, "mi.json", '{"autoattack_acc": 50, "n": 1e999}')]),
                               2, ["mi.json", "n must be an integer"]),
    'leaderboard "n": [1]': (_cli(lambda t: ["leaderboard", "--results",
                                             _write(t, "mi.json", '{"autoattack": {"robust_acc": 50, "n": [1]}}')]),
                             2, ["mi.json", "n must be an integer"]),
    'leaderboard "eps": [1]': (_cli(lambda t: ["leaderboard", "--model-info",
                                               _write(t, "mi.json", '{"autoattack_acc": 50, "eps": [1]}')]),
                               2, ["eps must be"]),
    'leaderboard "additional_data": "false"': (_cli(lambda t: [
        "leaderboard", "--model-info", _write(t, "mi.json", '{"autoattack_acc": 50, "additional_data": "false"}')]),
        2, ["mi.json", "additional_data must be true or false"]),
    # CIFAR pickles
    "CIFAR zero strides (6 x 138 bytes)": (lambda t: _load_cifar(_cifar_root(
        t, lambda: pickle.dumps({b"data": _ZeroStrides(), b"labels": []}, protocol=2))), 2,
        ["data_batch_1", "strides"]),
    "CIFAR memo-shared label lists": (lambda t: _load_cifar(_cifar_root(t, _memo_bomb_labels)), 2,
                                      ["data_batch_1", "'labels' must be a list of 2 integers"]),
    "CIFAR one string encoded 20000 times": (lambda t: _load_cifar(_cifar_root(t, _encode_bomb)), 2,
                                             ["data_batch_1", "byte strings claim more bytes than the file holds"]),
    "CIFAR 100000 nested lists": (lambda t: _load_cifar(_cifar_root(t, _deep_pickle)), 2,
                                  ["data_batch_1", "nested more than"]),
    "IDX gzip expanding beyond the cap": (lambda t: _idx_bomb(t), 2, ["labels.gz", "decompressed"]),
    # aux archives
    "aux deflated label member": (lambda t: _aux_data(_aux_deflated_label_bomb(t)), 2,
                                  ["aux.npz", "'label' is compressed"]),
    "aux negative shape": (lambda t: _aux_data(_aux(t, image=_npy(IMG, shape=(-1, -64, 1, 1)))), 2,
                           ["aux.npz", "shape (-1, -64, 1, 1)"]),
    "aux int64-overflowing shape": (lambda t: _aux_data(_aux(t, image=_npy(IMG, shape=(2 ** 62, 2 ** 62, 1, 1)))), 2,
                                    ["aux.npz", "its member holds"]),
    "aux lying header length": (lambda t: _aux_data(_aux(t, image=_npy(IMG)[:8] + struct.pack("<H", 60000)
                                                         + _npy(IMG)[10:])), 2, ["aux.npz", "header claims 60,000"]),
    "aux 200 images claimed, 150 stored": (lambda t: _aux_data(_aux(t, image=_npy(IMG, shape=(200, 8, 8, 3)))), 2,
                                           ["aux.npz", "'image'", "(200, 8, 8, 3)"]),
    "aux labels 10^10": (lambda t: _aux_data(_aux(t, label=_npy(LAB, shape=(10 ** 10,)))), 2,
                         ["aux.npz", "'label'", "(10000000000,)"]),
    "aux timedelta labels": (lambda t: _aux_data(_aux(t, label=_npy(np.array([np.timedelta64("NaT")] * 150)))), 2,
                             ["aux.npz", "integer class indices", "timedelta64"]),
    "aux npy version 9.9": (lambda t: _aux_data(_aux(t, image=_npy(IMG)[:6] + b"\x09\x09" + _npy(IMG)[8:])), 2,
                            ["aux.npz", "version 9.9"]),
    "aux image and image.npy": (lambda t: _aux_data(_aux(t, extra=[("image", _npy(IMG))])), 2,
                                ["aux.npz", "both 'image.npy' and 'image'"]),
    "aux labels out of range": (lambda t: _aux_data(_aux(t, label=_npy(LAB + 10))), 2,
                                ["aux.npz", "outside [0, 10)"]),
    "aux converter on a bad archive": (lambda t: (lambda a=[str(_aux(t, image=_npy(IMG, shape=(-1, 2, 2, 3)))),
                                                            str(t / "out.npz")]: _aux_main(a)), 2,
                                       ["aux.npz", "shape (-1, 2, 2, 3)"]),
    "quickstart into a used --out": (_cli(lambda t: ["quickstart", "--out", _write(t, "qs/summary.json", "{}").parent]),
                                     2, ["--out", "finished quickstart"]),
}


def _aux_main(argv):
    from rb_labelrefine.data.aux import _main

    return _main(argv)


def _relink(run: Path, name: str, target) -> Path:
    (run / name).unlink()
    (run / name).symlink_to(target)
    return run


def _refifo(run: Path, name: str) -> Path:
    (run / name).unlink()
    os.mkfifo(run / name)
    return run


def _thesis(t: Path) -> Path:
    other = t / "other_export"
    make_run(t / "run0")
    assert cli.main(["export", "--checkpoint", str(t / "run0"), "--out", str(other)]) == 0
    thesis = t / "thesis"
    thesis.mkdir()
    (thesis / "export.json").write_bytes((other / "export.json").read_bytes())
    (thesis / "thesis.tex").write_text("\\documentclass{article} years of work\n")
    return thesis


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_exit_2_naming_it_changes_nothing_and_stays_small(tmp_path, name, capsys):
    setup, want_code, needles = CASES[name]
    fn = setup(tmp_path)
    capsys.readouterr()
    before = _tree(tmp_path)
    code, err, peak, base = run_child(fn, tmp_path)
    assert code == want_code, f"exit {code}, expected {want_code}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    assert _tree(tmp_path) == before, "a file changed"
    assert peak < max(GiB, base + 512 * MiB), f"peak RSS {peak / MiB:.0f} MiB (parent {base / MiB:.0f} MiB)"


# ----------------------------------------------------------------------------- beyond the table

def test_protocol_5_cifar_pickles_load(tmp_path):
    from rb_labelrefine.data import load_cifar

    rng = np.random.default_rng(0)

    def batch():
        return pickle.dumps({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                             b"labels": [0, 1, 2, 3]}, protocol=5)
    train, test, info = load_cifar(_cifar_root(tmp_path, batch), "cifar10")
    assert len(train) == 20 and len(test) == 4 and info.num_classes == 10


def test_aux_converter_never_writes_through_a_planted_partial_link(tmp_path):
    from rb_labelrefine.data.aux import AuxData, _main

    src = tmp_path / "c.npz"
    np.savez_compressed(src, image=np.zeros((4, 8, 8, 3), np.uint8), label=np.arange(4))
    victim = _write(tmp_path, "victim.txt", "precious\n")
    (tmp_path / "out.npz.partial").symlink_to(victim)
    assert _main([str(src), str(tmp_path / "out.npz")]) == 0
    assert victim.read_text() == "precious\n"
    assert len(AuxData(tmp_path / "out.npz")) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial") and not p.is_symlink()]


def test_aux_file_truncated_while_open_is_detected_before_reading(tmp_path):
    from rb_labelrefine.data.aux import AuxData
    from rb_labelrefine.errors import CorruptDatasetError

    path = _aux(tmp_path)
    data = AuxData(path, num_classes=10)
    data.check()
    data.check(full=False)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CorruptDatasetError, match="aux.npz: changed while training read it.*size changed"):
        data.check(full=False)
    # rewritten in place with the same size: the digest of the headers and the tail tells
    path2 = _aux(tmp_path / "b")
    data2 = AuxData(path2, num_classes=10)
    raw = bytearray(path2.read_bytes())
    raw[-5] ^= 0xFF
    st = path2.stat()
    path2.write_bytes(bytes(raw))
    os.utime(path2, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptDatasetError, match="contents changed"):
        data2.check()


def test_killed_exports_partial_dirs_are_removed_by_the_next_export(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "exp"
    for i in range(3):   # what kill -9 during three exports leaves
        d = tmp_path / f".exp.{i:08x}.partial"
        d.mkdir()
        (d / "model.pt").write_bytes(b"half")
    unrelated = tmp_path / ".other.0000000a.partial"
    unrelated.mkdir()
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.0000000a.partial", "exp", "run"]


def test_a_partial_dir_in_use_is_left_alone(tmp_path):
    from rb_labelrefine.export.robustbench_export import _lock_dir, remove_stale_staging

    busy = tmp_path / ".exp.0000abcd.partial"
    busy.mkdir()
    fd = _lock_dir(busy)       # a concurrent export holds it
    pid = os.fork()
    if pid == 0:
        os._exit(0 if remove_stale_staging(tmp_path / "exp") == [] else 1)
    assert os.waitpid(pid, 0)[1] == 0 and busy.is_dir()
    os.close(fd)
    assert remove_stale_staging(tmp_path / "exp") == [busy] and not busy.exists()


def test_overwrite_still_replaces_an_export_its_manifest_describes(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "exp"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    # a file the manifest does not list: the whole directory is refused, the file kept
    (out / "models" / "notes.txt").write_text("mine\n")
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 2
    assert (out / "models" / "notes.txt").read_text() == "mine\n"


def test_sigterm_during_export_is_exit_3_with_a_message_and_no_partial(tmp_path):
    from rb_labelrefine.export import robustbench_export as rx

    run = make_run(tmp_path / "run")

    def child():
        real = rx._check_same_outputs

        def stop_midway(*a, **k):   # SIGTERM arrives while the export is being verified
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        rx._check_same_outputs = stop_midway
        return cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")])

    before = _tree(tmp_path)
    code, err, _, _ = run_child(child, tmp_path)
    assert code == 3, err
    assert "export stopped by SIGTERM" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_hook_turns_a_broken_pyautoattack_into_import_error(tmp_path):
    import subprocess

    pkg = tmp_path / "pyautoattack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('broken on purpose')\n")
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '_rb_labelrefine_autoattack_finder', 0)]\n"
            "from rb_labelrefine.compat.autoattack_hook import install\n"
            "install()\n"
            "try:\n    import autoattack\nexcept ImportError as e:\n    print('ImportError', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ImportError" in r.stdout and "broken on purpose" in r.stdout
