"""Gradient-masking sanity report (Carlini et al. 2019, "On Evaluating Adversarial Robustness";
ADR App. E; LTD §5.2).

A model whose robustness comes from broken gradients rather than from a wider margin looks
robust to gradient attacks and nothing else.  Each check below is a symptom such a model
shows and a genuinely robust model does not:

``eps_sweep``      PGD accuracy must fall to ~0 as the radius grows (an unbounded attack
                   always wins; ADR Fig. 7a);
``steps_sweep``    more PGD iterations must not raise robust accuracy materially (ADR Fig. 7b);
``black_box``      Square, which uses no gradients, must not beat the white-box attacks at the
                   same radius (LTD §5.2; AutoAttack's own ``check_square_sr``);
``autoattack_flags`` AutoAttack's own checks (randomised / probability outputs / dynamic
                   defence / zero gradients / Square beating APGD) must be silent;
``zero_gradient``  no correctly classified point may have an all-zero input gradient.

Every size is a parameter, so the same code runs as a seconds-long unit test (tiny model,
~50 points, a few dozen Square queries) and as a real check (hundreds of points, thousands of
queries).  A check that was not run is reported with ``passed: None`` ("not measured"), never
as a pass.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoattack import describe_autoattack, machine_info, rng_guard, run_autoattack, square_attack_class
from .pgd import NORMS, eval_mode, format_eps, iter_batches, pgd_attack

__all__ = ["CHECKS", "sanity_report", "format_sanity_markdown", "default_eps_grid"]

CHECKS = ("eps_sweep", "steps_sweep", "black_box", "autoattack_flags", "zero_gradient")


def default_eps_grid(eps: float, norm: str, input_dim: int) -> list[float]:
    """Radii from eps/4 up to a radius that covers the whole input box.

    ℓ∞: eps·{1/4, …, 32}, capped at 1 (8/255 gives 2, 4, …, 128, 255 /255 as in ADR Fig. 7a).
    ℓ2: eps·{1/4, …, 32} and finally sqrt(d), the diameter of [0, 1]^d, so the last radius
    reaches any image.
    """
    grid = [eps * f for f in (0.25, 0.5, 1, 2, 4, 8, 16, 32)]
    if norm == "Linf":
        grid = sorted({min(e, 1.0) for e in grid})
    else:
        grid = sorted(set(grid + [math.sqrt(input_dim)]))
    return grid


def _collect(data, n_ex: int, batch_size: int) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for x, y in iter_batches(data, batch_size, n_ex):
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu())
    if not xs:
        raise ValueError("no data for the sanity report")
    return torch.cat(xs), torch.cat(ys).long()


def _robust_mask(model, x, y, eps, alpha, steps, norm, batch_size, device, generator) -> Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        if eps > 0 and bool(ok.any()):
            idx = ok.nonzero(as_tuple=True)[0]
            x_adv = pgd_attack(model, xb[idx], yb[idx], eps, alpha, steps, norm, True, generator)
            with torch.no_grad():
                ok[idx] = model(x_adv).argmax(1) == yb[idx]
        out.append(ok.cpu())
    return torch.cat(out)


def _pct(mask: Tensor) -> float:
    return 100.0 * mask.float().mean().item()


def _generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _eps_sweep(model, x, y, grid, steps, norm, zero_acc_max, tol, batch_size, device, seed):
    accs = []
    for e in grid:
        alpha = 2.5 * e / steps
        accs.append(_pct(_robust_mask(model, x, y, e, alpha, steps, norm, batch_size, device,
                                      _generator(device, seed))))
    rises = [(grid[i], accs[i]) for i in range(1, len(accs)) if accs[i] > min(accs[:i]) + tol]
    last = accs[-1]
    if last > zero_acc_max:
        passed, reason = False, (f"PGD-{steps} accuracy is still {last:.1f}% at the largest radius "
                                 f"{format_eps(grid[-1])}; an unbounded attack should reach ~0% "
                                 "(a sign of masked or obfuscated gradients)")
    elif rises:
        e, a = rises[0]
        passed, reason = False, (f"accuracy rises to {a:.1f}% at eps={format_eps(e)} although a "
                                 "larger radius can only help the attacker")
    else:
        noisy = any(accs[i] > min(accs[:i]) for i in range(1, len(accs)))
        passed, reason = True, (f"accuracy falls to {last:.1f}% at eps={format_eps(grid[-1])}"
                                + (f" (rises along the way stay within the {tol:g}-point noise tolerance)"
                                   if noisy else ""))
    return {"eps": [float(e) for e in grid], "acc": accs, "steps": steps, "passed": passed, "reason": reason}


def _steps_sweep(model, x, y, eps, alpha, steps_grid, norm, tol, batch_size, device, seed):
    accs = [_pct(_robust_mask(model, x, y, eps, alpha, k, norm, batch_size, device, _generator(device, seed)))
            for k in steps_grid]
    rises = [(steps_grid[i], accs[i]) for i in range(1, len(accs)) if accs[i] > min(accs[:i]) + tol]
    if rises:
        k, a = rises[0]
        passed, reason = False, (f"PGD-{k} gives {a:.1f}%, more than fewer steps did "
                                 f"({min(accs[:steps_grid.index(k)]):.1f}%): more iterations should "
                                 "never help the defender")
    else:
        # Only a rise beyond `tol` fails; a smaller one is sampling noise, and the wording says so.
        noisy = any(accs[i] > min(accs[:i]) for i in range(1, len(accs)))
        claim = (f"accuracy rises by no more than the {tol:g}-point noise tolerance with more steps" if noisy
                 else "accuracy does not rise with more steps")
        passed, reason = True, f"{claim} ({accs[0]:.1f}% at {steps_grid[0]} -> {accs[-1]:.1f}% at {steps_grid[-1]})"
    return {"steps": list(steps_grid), "acc": accs, "eps": float(eps), "alpha": float(alpha),
            "passed": passed, "reason": reason}


def _square(model, x, y, eps, norm, n_queries, batch_size, device, seed) -> float:
    Square = square_attack_class()
    attack = Square(model, norm=norm, n_queries=n_queries, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                    verbose=False, device=device, resc_schedule=False)
    robust = 0
    with rng_guard(device):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with torch.no_grad():
                x_adv = attack.perturb(xb, yb)
                robust += (model(x_adv).argmax(1) == yb).sum().item()
    return 100.0 * robust / len(x)


def _zero_gradient(model, x, y, batch_size, device):
    n_zero = n_correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        xb = xb.clone().requires_grad_(True)
        logits = model(xb)
        correct = logits.argmax(1) == yb
        loss = F.cross_entropy(logits, yb, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        zero = grad.flatten(1).abs().sum(1) == 0
        n_zero += (zero & correct).sum().item()
        n_correct += correct.sum().item()
    frac = n_zero / max(n_correct, 1)
    if n_zero:
        passed, reason = False, (f"{n_zero} of {n_correct} correctly classified points have an all-zero "
                                 "input gradient: gradient attacks cannot move them")
    else:
        passed, reason = True, "every correctly classified point has a non-zero input gradient"
    return {"n_zero": n_zero, "n_correct": n_correct, "fraction": frac, "passed": passed, "reason": reason}


def sanity_report(model: nn.Module, data, y: Optional[Tensor] = None, *, eps: float = 8 / 255, norm: str = "Linf", n_ex: int = 200,
                  eps_grid: Optional[Sequence[float]] = None, eps_sweep_steps: int = 20,
                  steps_grid: Sequence[int] = (10, 20, 50, 100), alpha: Optional[float] = None,
                  square_queries: int = 1000, autoattack: Union[None, bool, dict] = None,
                  autoattack_iters: int = 20, tol: float = 2.0, zero_acc_max: float = 2.0,
                  batch_size: int = 256, seed: int = 0, device="cpu") -> dict:
    """Run the gradient-masking checks on the first ``n_ex`` points of ``data``.

    ``data`` is a loader yielding ``(x, y[, idx])`` or a tensor pair; ``sanity_report(model, x, y)``
    works too.

    Args:
        eps, norm: the threat model the robustness claim is made for.
        eps_grid: radii of the ``eps_sweep`` (default :func:`default_eps_grid`).
        eps_sweep_steps: PGD steps at each radius (step size 2.5·eps/steps).
        steps_grid, alpha: the ``steps_sweep`` at ``eps`` with a fixed step size
            (default eps/4, i.e. 2/255 at 8/255), so more steps are strictly more search.
        square_queries: Square's query budget for ``black_box`` (AutoAttack uses 5000).
        autoattack: a :func:`run_autoattack` result whose flags to report; ``None`` runs a quick
            custom AutoAttack (APGD-CE, ``autoattack_iters`` iterations) for its flags;
            ``False`` skips the check (reported as not measured).
        tol: how many percentage points a later accuracy may exceed an earlier one before it
            counts as a rise (sampling noise: one point of 50 is 2 points).
        zero_acc_max: the largest accuracy (percent) accepted at the largest radius.

    Returns a dict with one entry per check (its numbers, ``passed`` and ``reason``), the overall
    ``passed`` (``True`` only if every check that ran passed) and the list of ``failed`` checks.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    steps_grid = [int(k) for k in steps_grid]
    if not steps_grid or any(k < 1 for k in steps_grid):
        raise ValueError(f"steps_grid must be positive integers, got {steps_grid}")
    device = torch.device(device)
    start = time.perf_counter()
    x, y = _collect((data, y) if y is not None else data, n_ex, batch_size)
    model = model.to(device)
    if eps_grid is None:
        eps_grid = default_eps_grid(eps, norm, x[0].numel())
    eps_grid = sorted(float(e) for e in eps_grid)
    alpha = eps / 4 if alpha is None else alpha

    checks: dict = {}
    with eval_mode(model):
        with torch.no_grad():
            clean = torch.cat([(model(x[i:i + batch_size].to(device)).argmax(1) == y[i:i + batch_size].to(device)).cpu()
                               for i in range(0, len(x), batch_size)])
        checks["eps_sweep"] = _eps_sweep(model, x, y, eps_grid, eps_sweep_steps, norm, zero_acc_max, tol,
                                         batch_size, device, seed)
        checks["steps_sweep"] = _steps_sweep(model, x, y, eps, alpha, steps_grid, norm, tol, batch_size,
                                             device, seed)

        aa_result = autoattack if isinstance(autoattack, dict) else None
        if autoattack is None:
            # APGD-DLR too: pyautoattack runs its zero-gradient check only on the DLR loss, and
            # the DLR loss needs at least three classes.
            with torch.no_grad():
                n_classes = model(x[:1].to(device)).shape[1]
            attacks = ["apgd-ce", "apgd-dlr"] if n_classes >= 3 else ["apgd-ce"]
            aa_result = run_autoattack(model, x, y, norm=norm, eps=eps, version="custom", attacks=attacks,
                                       attack_params={"apgd.n_iter": autoattack_iters, "apgd.n_restarts": 1},
                                       batch_size=batch_size, seed=seed, device=device)

        square_acc = _square(model, x, y, eps, norm, square_queries, batch_size, device, seed)
        white = {f"PGD-{k}": a for k, a in zip(steps_grid, checks["steps_sweep"]["acc"])}
        if aa_result is not None and aa_result.get("eps") == float(eps) and aa_result.get("norm") == norm \
                and aa_result.get("n") == len(x):
            white[f"AutoAttack {aa_result.get('version')}"] = aa_result["robust_acc"]
        best_name = min(white, key=white.get)
        best = white[best_name]
        if square_acc < best - tol:
            passed, reason = False, (f"Square ({square_queries} queries, no gradients) reaches {square_acc:.1f}%, "
                                     f"below the best white-box attack ({best_name}: {best:.1f}%): the "
                                     "gradients mislead the white-box attacks")
        else:
            passed, reason = True, (f"Square {square_acc:.1f}% >= white-box {best_name} {best:.1f}% "
                                    f"(tolerance {tol:g} points)")
        checks["black_box"] = {"square_acc": square_acc, "n_queries": square_queries, "white_box": white,
                               "best_white_box": best_name, "passed": passed, "reason": reason}

        if aa_result is None:
            checks["autoattack_flags"] = {"flags": [], "source": None, "passed": None,
                                          "reason": "not measured (AutoAttack was not run)"}
        else:
            flags = list(aa_result.get("flags") or [])
            checks["autoattack_flags"] = {
                "flags": flags, "source": describe_autoattack(aa_result),
                "backend": f"{aa_result.get('backend')} {aa_result.get('backend_version')}",
                "passed": not flags,
                "reason": "AutoAttack raised no flags" if not flags else f"AutoAttack flagged: {flags[0]}"
                + (f" (+{len(flags) - 1} more)" if len(flags) > 1 else ""),
            }
        checks["zero_gradient"] = _zero_gradient(model, x, y, batch_size, device)

    failed = [name for name in CHECKS if checks[name]["passed"] is False]
    not_run = [name for name in CHECKS if checks[name]["passed"] is None]
    return {
        "norm": norm,
        "eps": float(eps),
        "n": len(x),
        "clean_acc": _pct(clean),
        "seed": seed,
        "checks": checks,
        "passed": not failed,
        "failed": failed,
        "not_measured": not_run,
        "elapsed_s": time.perf_counter() - start,
        "machine": machine_info(device),
    }


def _fmt_acc(v) -> str:
    return "not measured" if v is None else f"{v:.1f}%"


def _mark(passed) -> str:
    return {True: "pass", False: "**FAIL**", None: "not measured"}[passed]


def format_sanity_markdown(report: Optional[dict]) -> str:
    """The report as Markdown (for model cards); ``None`` renders as "not measured"."""
    if not report:
        return "Gradient-masking sanity checks: not measured.\n"
    c = report["checks"]
    verdict = "all checks that ran passed" if report["passed"] else f"FAILED: {', '.join(report['failed'])}"
    lines = [
        f"Gradient-masking sanity checks (Carlini et al. 2019) on {report['n']} points, "
        f"{report['norm']} eps={format_eps(report['eps'])}, clean accuracy {report['clean_acc']:.1f}%: "
        f"**{verdict}**.",
        "",
        "| check | result | verdict | reason |",
        "|---|---|---|---|",
    ]
    es = c["eps_sweep"]
    lines.append("| accuracy vs eps (PGD-{}) | {} | {} | {} |".format(
        es["steps"], ", ".join(f"{format_eps(e)}: {a:.1f}%" for e, a in zip(es["eps"], es["acc"])),
        _mark(es["passed"]), es["reason"]))
    ss = c["steps_sweep"]
    lines.append("| accuracy vs PGD steps (eps={}) | {} | {} | {} |".format(
        format_eps(ss["eps"]), ", ".join(f"{k}: {a:.1f}%" for k, a in zip(ss["steps"], ss["acc"])),
        _mark(ss["passed"]), ss["reason"]))
    bb = c["black_box"]
    lines.append("| black-box (Square, {} queries) vs white-box | Square {} vs {} {} | {} | {} |".format(
        bb["n_queries"], _fmt_acc(bb["square_acc"]), bb["best_white_box"],
        _fmt_acc(bb["white_box"][bb["best_white_box"]]), _mark(bb["passed"]), bb["reason"]))
    af = c["autoattack_flags"]
    lines.append("| AutoAttack's own flags | {} | {} | {} |".format(
        "; ".join(af["flags"]) if af["flags"] else ("none" if af["passed"] is not None else "not measured"),
        _mark(af["passed"]), af["reason"]))
    zg = c["zero_gradient"]
    lines.append("| zero input gradients | {} of {} | {} | {} |".format(
        zg["n_zero"], zg["n_correct"], _mark(zg["passed"]), zg["reason"]))
    return "\n".join(lines) + "\n"
