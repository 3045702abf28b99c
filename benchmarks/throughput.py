#!/usr/bin/env python
"""Training-step throughput of every objective, method and companion, on one model, batch and device.

    python benchmarks/throughput.py                         # CPU default: small_cnn, 28x28x1, batch 128, PGD-10
    python benchmarks/throughput.py --variants --reps 21 --json benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --device cuda --gpu-archs --json benchmarks/results/throughput_gpu.json

What is timed is the package's real code path: a :class:`~rb_labelrefine.training.trainer.Trainer`
is set up for each configuration (rectifier, objective + torchattacks attack, WA/SWA/AWP, optimizer,
the fast-path runtime) and one call of ``Trainer.train_step`` -- plus the loop's per-step work
(batch validation, the device-side loss/accuracy sums) -- is one step.  All configurations use the
same model initialisation, the same batch and the same device.

Timing: adjacent pairs.  Each round (after ``--warmup`` untimed rounds) visits every (configuration,
its base objective) pair in a fresh random order and times the two steps back to back, alternating
which goes first; ``ratio`` is the median over rounds of (configuration / base) within a pair, with
its quartiles and a bootstrap 95 % interval of that median -- the two steps of a pair ran under
the same machine load.  The clock is the
process CPU time on the CPU (a one-thread process's own work; other processes' load inflates wall
time several-fold but CPU time much less) and the synchronised wall clock on CUDA (``--clock``).
``FLOP ratio`` is the same ratio in matmul/convolution FLOPs (forward + backward + attack), counted
with torch's FLOP formulas -- deterministic, load-independent, blind to elementwise work.

``straightforward pgd_at+adr`` is the same PGD-AT + ADR step written the obvious way: a torchattacks
PGD rebuilt every step, a timm-ModelEmaV2-style teacher (python loop over the state dict,
``ema * d + (1 - d) * w``), and ``.item()`` logging of loss and accuracy every step.  It is paired
with the package's ``pgd_at+adr`` step (``package/this``; < 1: the package is faster).

Peak memory: CUDA -- ``torch.cuda.max_memory_allocated`` over a timed step (after a reset).  CPU --
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after one untimed step minus before it, the high-water
mark reset first (``/proc/self/clear_refs``) and glibc's free memory returned to the OS
(``malloc_trim``), so it is the step's own transient memory (activations, autograd buffers, new
gradients), measured per configuration in one process (:class:`CpuPeakMemory`; KiB -> MiB).

SWA changes nothing per step (one snapshot per epoch): its record also carries the time of that
snapshot (``epoch_hook_ms``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BASES = ("pgd_at", "trades")
METHODS = ("adr", "sglr", "ltd", "kd")
COMPANIONS = ("wa", "awp", "swa")
STRAIGHTFORWARD = "straightforward pgd_at+adr"
#: overhead targets over the base objective (measured here, not asserted by tests)
TARGETS = {"adr": 1.04, "sglr": 1.05, "ltd": 1.05, "kd": 1.08}


# ----------------------------------------------------------------------------- configurations
def config_names(variants: bool) -> list[str]:
    names = []
    for base in BASES:
        names.append(base)
        names += [f"{base}+{m}" for m in METHODS if not (m == "ltd" and base != "trades")]  # LTD is TRADES-form
        names += [f"{base}+{c}" for c in COMPANIONS]
    names.append(STRAIGHTFORWARD)
    if variants:
        names += ["pgd_at+adr [channels_last]", "pgd_at+adr [bf16]"]
    return names


def base_of(name: str) -> str:
    """What a configuration's ratio is taken against: its objective; a variant ("... [bf16]")
    against the same configuration without it."""
    if name == STRAIGHTFORWARD:
        return "pgd_at"
    if " [" in name:
        return name.split(" [")[0]
    return name.split("+")[0]


def build_config(name: str, args, teacher_path: str):
    from rb_labelrefine.config import config_from_dict, validate

    spec, _, variant = name.partition(" ")
    parts = spec.split("+")
    base, extra = parts[0], parts[1:]
    d = {
        "name": name,
        "data": {"name": "synthetic", "batch_size": args.batch, "val_fraction": 0.0},
        "model": {"arch": args.arch},
        "objective": {"name": base},
        "attack": {"eps": args.eps, "alpha": args.eps / 4, "steps": args.attack_steps, "bn_mode": "train"},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"epochs": 1, "device": args.device, "threads": args.threads, "seed": 0,
                  "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile},
        "method": {"name": "onehot"},
    }
    if variant == "[channels_last]":
        d["train"]["channels_last"] = True
    if variant == "[bf16]":
        d["train"]["amp"] = "bf16"
    for e in extra:
        if e == "adr":
            d["method"] = {"name": "adr"}
        elif e == "sglr":
            d["method"] = {"name": "sglr"}
        elif e == "ltd":
            d["method"] = {"name": "ltd", "teacher": teacher_path}            # tau = 5, LTD's default
        elif e == "kd":
            d["method"] = {"name": "kd", "robust_teacher": teacher_path,       # T = 2, paper weights
                           "standard_teacher": teacher_path}
        elif e in ("wa", "awp"):
            d[e] = {"enabled": True}
        elif e == "swa":
            d["swa"] = {"enabled": True, "start_epoch": 0}
        else:
            raise ValueError(f"unknown part {e!r} in {name!r}")
    return validate(config_from_dict(d))


def make_data(args):
    from rb_labelrefine.data import build_datasets

    n = max(args.batch, 256)
    return build_datasets("synthetic", val_fraction=0.0, n_train=n, n_test=16, image_size=args.image_size,
                          channels=args.channels)


def write_teacher(args, datasets, out_dir: Path) -> str:
    """A frozen teacher of the student's architecture (random weights: timing only)."""
    from rb_labelrefine.runs import build_model_for, write_weights

    cfg = build_config("pgd_at", args, "unused")
    torch.manual_seed(1)
    model = build_model_for(cfg, datasets[3])
    path = out_dir / "teacher.safetensors"
    write_weights(model, path, {"arch": args.arch})
    return str(path)


class PackageStep:
    """One configuration: a Trainer set up for it; ``__call__`` = one step of its training loop."""

    def __init__(self, name, args, datasets, teacher_path, out_dir):
        from rb_labelrefine.training.stream import check_batch
        from rb_labelrefine.training.trainer import Trainer

        self.name = name
        self.cfg = build_config(name, args, teacher_path)
        self.trainer = Trainer(self.cfg, out_dir / "run", progress=False, handle_signals=False, datasets=datasets)
        self.trainer._setup()
        self.trainer.global_step = 0
        self.trainer.model.train()
        self.device = self.trainer.device
        self._check = check_batch
        self.C = self.trainer.info.num_classes
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)

    def __call__(self, batch):
        x, y, idx = batch
        t = self.trainer
        self._check(x, y, idx, self.C, "benchmark batch")
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss, logits_adv = t.train_step(x, y, idx, 0)
        self.loss_sum += loss.detach() * y.shape[0]
        self.correct += (logits_adv.detach().argmax(1) == y).sum()

    def epoch_hook_ms(self) -> float | None:
        swa = self.trainer.swa
        if swa is None:
            return None
        t0 = time.perf_counter()
        swa.end_epoch(self.trainer.model, 0)
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0)


class TimmStyleEMA:
    """timm ``ModelEmaV2``'s update, as commonly copied: a python loop over the state dict."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.copy_(ema_v * self.decay + (1.0 - self.decay) * model_v)
            else:
                ema_v.copy_(model_v)


class StraightforwardADRStep:
    """PGD-AT + ADR written the obvious way (the same math as the package's ``pgd_at+adr``)."""

    def __init__(self, args, datasets, device):
        from rb_labelrefine.runs import build_model_for

        cfg = build_config("pgd_at+adr", args, "unused")
        torch.manual_seed(cfg.train.seed)
        self.device = device
        self.model = build_model_for(cfg, datasets[3]).to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = cfg
        m, a = cfg.method, cfg.attack
        n_batches = -(-len(datasets[0]) // cfg.data.batch_size)
        self.total_steps = n_batches * cfg.train.epochs
        self.ema = TimmStyleEMA(self.model, m.ema_decay)
        o = cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.step = 0
        self.log = []

    def _sched(self, start, end):
        import math
        p = min(max(self.step / self.total_steps, 0.0), 1.0)
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))

    def __call__(self, batch):
        import torchattacks

        x, y, _ = batch
        x, y = x.to(self.device), y.to(self.device)
        m, a, model = self.cfg.method, self.cfg.attack, self.model
        tau, lam = self._sched(m.tau_high, m.tau_low), self._sched(m.lambda_low, m.lambda_high)
        with torch.no_grad():
            pt = F.softmax(self.ema.module(x).float() / tau, dim=1)                  # ADR Eq. 3
        gap = pt.max(1).values - pt.gather(1, y[:, None]).squeeze(1)
        lam_i = (lam - gap).clamp(0, 1)[:, None]                                       # Eq. 4
        target = lam_i * pt + (1 - lam_i) * F.one_hot(y, pt.shape[1]).float()          # Eq. 5
        atk = torchattacks.PGD(model, eps=a.eps, alpha=a.alpha, steps=a.steps, random_start=a.random_start)
        atk.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=False)
        x_adv = atk(x, target)
        model.train()
        logits = model(x_adv)
        loss = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(model)
        self.step += 1
        self.log.append((loss.item(), (logits.argmax(1) == y).float().mean().item()))
        return loss.detach(), logits.detach()

    def epoch_hook_ms(self):
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def build_step(name, args, datasets, teacher_path, out_dir, device):
    if name == STRAIGHTFORWARD:
        return StraightforwardADRStep(args, datasets, device)
    return PackageStep(name, args, datasets, teacher_path, out_dir)


def fixed_batch(datasets, batch_size):
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(datasets[0], batch_size=batch_size, shuffle=False)))


# ----------------------------------------------------------------------------- CPU peak memory
class CpuPeakMemory:
    """Peak resident memory of one step on the CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    after the step minus before it, with the high-water mark reset to the current RSS first
    (Linux ``/proc/self/clear_refs`` <- 5) and glibc's free lists returned to the OS
    (``malloc_trim(0)``), so each configuration's step is measured on its own in one process.
    ``available`` is False where either is not possible (then no CPU memory is reported)."""

    method = ("resource.getrusage ru_maxrss delta over one step (high-water mark reset via "
              "/proc/self/clear_refs after glibc malloc_trim(0)); a separate untimed pass")

    def __init__(self):
        import ctypes
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._reset()
            self.available = True
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn) -> dict:
        self._trim(0)
        self._reset()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"step_rss_delta_mib": (after - before) / 1024.0, "peak_rss_mib": after / 1024.0}


# ----------------------------------------------------------------------------- timing
def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return [q[0], q[2]]


def _median_ci(xs, n_boot: int = 2000, seed: int = 1):
    """Bootstrap 95 % interval of the median (percentile method, fixed seed)."""
    if len(xs) < 3:
        return [min(xs), max(xs)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return [meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]]


def count_flops(step, batch) -> int | None:
    """Matmul/convolution FLOPs of one step (forward and backward, attack included), counted by
    ``torch.utils.flop_counter.FlopCounterMode``: deterministic, so its ratios do not depend on the
    machine's load (elementwise work -- EMA, optimizer, softmax -- is not counted)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
    except ImportError:  # pragma: no cover - old torch
        return None

    class Count(TorchDispatchMode):
        # FlopCounterMode's per-op formulas without its module tracker (whose hooks refuse
        # torch.autograd.grad w.r.t. a leaf input -- exactly what an attack does)
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            f = flop_registry.get(func._overloadpacket)
            if f is None:
                # under inference_mode composite ops (conv2d, linear) arrive undecomposed: decompose
                # them with this mode active, so their convolution/addmm are counted
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            if f is not None:
                Count.total += int(f(*args, **kwargs, out_val=out))
            return out

    with Count():
        step(batch)
    return Count.total


def time_configs(names, args, arch_label) -> list[dict]:
    """Adjacent pairs: every round visits each (configuration, its base) pair in a fresh random
    order and times the two steps back to back (alternating which goes first), so the ratio of a
    pair compares two steps taken under the same machine load."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = make_data(args)
        teacher = write_teacher(args, datasets, tmp)
        steps = {}
        for name in names:
            (tmp / name.replace(" ", "_")).mkdir()
            steps[name] = build_step(name, args, datasets, teacher, tmp / name.replace(" ", "_"), device)
            print(f"[setup] {name}", file=sys.stderr, flush=True)
        batch = fixed_batch(datasets, args.batch)  # on the host: each step moves it, as the loop does
        pairs = [(n, base_of(n)) for n in names if base_of(n) != n]
        if STRAIGHTFORWARD in names and "pgd_at+adr" in names:
            pairs.append(("pgd_at+adr", STRAIGHTFORWARD))  # the package's step against the obvious one
        rng = random.Random(0)
        times = {n: [] for n in names}     # the clock the ratios use (see --clock)
        walls = {n: [] for n in names}
        cpus = {n: [] for n in names}
        ratios = {pair: [] for pair in pairs}
        peak_cuda = {}

        def timed(name):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[name](batch)
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if device.type == "cuda":
                peak_cuda[name] = max(peak_cuda.get(name, 0), torch.cuda.max_memory_allocated(device))
            return dt, dc

        rounds = args.warmup + args.reps
        for r in range(rounds):
            order = list(pairs)
            rng.shuffle(order)
            for k, (a, b) in enumerate(order):
                res = {}
                for n in ((a, b) if (r + k) % 2 == 0 else (b, a)):
                    res[n] = timed(n)
                if r < args.warmup:
                    continue
                for n, (dt, dc) in res.items():
                    walls[n].append(dt)
                    cpus[n].append(dc)
                    times[n].append(dc if clock == "cpu" else dt)
                i = 1 if clock == "cpu" else 0
                ratios[(a, b)].append(res[a][i] / res[b][i])
            done = f"round {r + 1}/{rounds}" + (" (warm-up)" if r < args.warmup else "")
            print(f"[time] {done}", file=sys.stderr, flush=True)
        flops = {}
        if args.flops:
            for name in names:
                flops[name] = count_flops(steps[name], batch)
        mem = {}
        if device.type == "cpu" and args.memory:
            probe = CpuPeakMemory()
            if probe.available:
                print("[memory] one untimed step per configuration", file=sys.stderr, flush=True)
                for name in names:
                    mem[name] = {**probe.measure(lambda: steps[name](batch)), "memory_method": probe.method}
        hooks = {n: steps[n].epoch_hook_ms() for n in names}
        finite = {n: bool(torch.isfinite(steps[n].loss_sum)) for n in names if hasattr(steps[n], "loss_sum")}
    records = []
    for name in names:
        ts = times[name]
        base = base_of(name) if name != base_of(name) else None
        med = statistics.median(ts)
        rec = {"name": name, "arch": arch_label, "base": base, "clock": clock,
               "step_s_median": med, "step_s_quartiles": _quartiles(ts), "n_steps_timed": len(ts),
               "samples_per_s": args.batch / med,
               "wall_s_median": statistics.median(walls[name]), "cpu_s_median": statistics.median(cpus[name]),
               "device": str(device)}
        if base is not None:
            rs = ratios[(name, base)]
            rec["ratio"] = statistics.median(rs)
            rec["ratio_quartiles"] = _quartiles(rs)
            rec["ratio_median_ci95"] = _median_ci(rs)
            rec["ratio_all"] = rs
            rec["ratio_of_medians"] = med / statistics.median(times[base])
        if name == STRAIGHTFORWARD and ("pgd_at+adr", STRAIGHTFORWARD) in ratios:
            rs = ratios[("pgd_at+adr", STRAIGHTFORWARD)]
            rec["package_over_straightforward"] = statistics.median(rs)
            rec["package_over_straightforward_quartiles"] = _quartiles(rs)
            rec["package_over_straightforward_ci95"] = _median_ci(rs)
        if flops.get(name):
            rec["flops"] = flops[name]
            if base is not None and flops.get(base):
                rec["flop_ratio"] = flops[name] / flops[base]
        if device.type == "cuda":
            rec["peak_memory_mib"] = peak_cuda[name] / 2 ** 20
            rec["memory_method"] = "torch.cuda.max_memory_allocated over one step"
        rec.update(mem.get(name, {}))
        if hooks[name] is not None:
            rec["epoch_hook_ms"] = hooks[name]
        if name in finite:
            rec["loss_finite"] = finite[name]
        method = name.split(" ")[0].split("+")[1] if "+" in name.split(" ")[0] else None
        if method in TARGETS and "[" not in name and name != STRAIGHTFORWARD:
            rec["target_ratio"] = TARGETS[method]
            rec["meets_target"] = rec["ratio"] <= TARGETS[method]
        records.append(rec)
    return records


def time_parts(args, reps: int = 300) -> dict:
    """CPU time of the per-step work in which the package's PGD-AT + ADR step and the straightforward
    one differ (everything else -- the teacher forward, rectification, attack, loss, backward,
    optimizer -- is the same code), plus ADR's own components: small operations, so hundreds of
    repetitions give tight medians even on a loaded machine."""
    import torchattacks

    from rb_labelrefine.fast import teacher_forward
    from rb_labelrefine.rectifiers.adr import rectify
    from rb_labelrefine.training.stream import check_batch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        datasets = make_data(args)
        pkg = PackageStep("pgd_at+adr", args, datasets, "unused", Path(tmp))
        plain = StraightforwardADRStep(args, datasets, torch.device("cpu"))
        t, (x, y, idx) = pkg.trainer, fixed_batch(datasets, args.batch)
        a = t.cfg.attack
        loss, logits = torch.tensor(1.0), torch.zeros(args.batch, 10)

        def package_only():  # the trainer's per-step bookkeeping + its EMA (foreach lerp)
            check_batch(x, y, idx, pkg.C, "batch")
            t._snapshot_step_state()
            t.rectifier.teacher.update(t.model)
            pkg.loss_sum += loss * y.shape[0]
            pkg.correct += (logits.argmax(1) == y).sum()

        def straightforward_only():  # attack rebuilt, timm-style EMA loop, .item() logging
            atk = torchattacks.PGD(plain.model, eps=a.eps, alpha=a.alpha, steps=a.steps, random_start=True)
            atk.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=False)
            plain.ema.update(plain.model)
            loss.item()
            (logits.argmax(1) == y).float().mean().item()

        parts = {"package-only per-step work": package_only,
                 "straightforward-only per-step work": straightforward_only,
                 "ADR teacher forward (inference mode)": lambda: teacher_forward(t.rectifier.teacher, x),
                 "ADR rectify (Eq. 3-5)": lambda: rectify(torch.zeros(args.batch, 10), y, 2.0, 0.8),
                 "ADR EMA update (foreach lerp)": lambda: t.rectifier.teacher.update(t.model)}
        out = {}
        for name, fn in parts.items():
            for _ in range(5):
                fn()
            v = []
            for _ in range(reps):
                c = time.process_time()
                fn()
                v.append(time.process_time() - c)
            out[name] = {"ms_median": 1000 * statistics.median(v),
                         "ms_ci95": [1000 * q for q in _median_ci(v)], "reps": reps}
            print(f"[parts] {name}: {out[name]['ms_median']:.3f} ms", file=sys.stderr, flush=True)
    return out


def markdown_table(records) -> str:
    clock = records[0]["clock"] if records else "cpu"
    lines = [f"| arch | configuration | step (s, median {clock} time) | wall (s, median) | samples/s | ratio to base "
             "(95% CI of the median) | FLOP ratio | target | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ratio = (f"{r['ratio']:.3f} ({r['ratio_median_ci95'][0]:.3f}-{r['ratio_median_ci95'][1]:.3f})"
                 if "ratio" in r else "1 (base)")
        if "package_over_straightforward" in r:
            q = r.get("package_over_straightforward_ci95")
            ratio += f"; package/this {r['package_over_straightforward']:.3f}" + (f" ({q[0]:.3f}-{q[1]:.3f})" if q else "")
        fr = f"{r['flop_ratio']:.3f}" if "flop_ratio" in r else ""
        target = (f"<= {r['target_ratio']:.2f} {'yes' if r['meets_target'] else 'NO'}" if "target_ratio" in r else "")
        mem = r.get("peak_memory_mib", r.get("step_rss_delta_mib"))
        mem = f"{mem:.0f}" if isinstance(mem, (int, float)) else "n/a"
        name = r["name"] + (f" (SWA snapshot {r['epoch_hook_ms']:.1f} ms/epoch)" if "epoch_hook_ms" in r else "")
        lines.append(f"| {r['arch']} | {name} | {r['step_s_median']:.3f} | {r['wall_s_median']:.3f} | "
                     f"{r['samples_per_s']:.0f} | {ratio} | {fr} | {target} | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: least disturbed by load)")
    p.add_argument("--reps", type=int, default=9, help="timed rounds (median)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="what a step's time is: auto = process CPU time on the CPU (a 1-thread process's "
                        "work, barely affected by other processes' load), wall clock (synchronised) on CUDA")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--configs", nargs="*", help="subset of configurations (default: all)")
    p.add_argument("--variants", action="store_true", help="also pgd_at+adr with channels_last and bf16")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="train.amp for every configuration")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gpu-archs", action="store_true",
                   help="CUDA: also ResNet-18 and WRN-34-10 on 32x32x3 at the same batch")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="CPU: skip the memory pass")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-count pass")
    p.add_argument("--parts", action="store_true",
                   help="also time the per-step work in which the package's and the straightforward PGD-AT+ADR "
                        "steps differ, and ADR's components (CPU, hundreds of repetitions)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--md", help="write the markdown table here")
    args = p.parse_args(argv)

    names = args.configs or config_names(args.variants)
    unknown = [n for n in names if n not in config_names(True)]
    if unknown:
        p.error(f"unknown configurations {unknown}; known: {config_names(True)}")
    needed = {base_of(n) for n in names} | ({"pgd_at+adr"} if STRAIGHTFORWARD in names else set())
    names = sorted(needed - set(names)) + names
    load_before = os.getloadavg()
    t_start = time.time()
    archs = [(args.arch, args.image_size, args.channels)]
    if args.gpu_archs:
        if not (args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())):
            p.error("--gpu-archs needs a CUDA device")
        archs += [("resnet18", 32, 3), ("wrn_34_10", 32, 3)]
    records = []
    for arch, size, ch in archs:
        a = copy.copy(args)
        a.arch, a.image_size, a.channels = arch, size, ch
        label = f"{arch} {size}x{size}x{ch}"
        records += time_configs(names, a, label)
    meta = {
        "device": records[0]["device"],
        "device_name": (torch.cuda.get_device_name(0) if records[0]["device"].startswith("cuda") else _cpu_model()),
        "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "batch": args.batch, "attack_steps": args.attack_steps,
        "eps": args.eps, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "reps": args.reps, "warmup": args.warmup, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "wall_s": round(time.time() - t_start, 1),
    }
    table = markdown_table(records)
    print(table)
    result = {"meta": meta, "records": records}
    if args.parts:
        result["parts"] = time_parts(args)
        print("\n".join(f"{k}: {v['ms_median']:.3f} ms" for k, v in result["parts"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
