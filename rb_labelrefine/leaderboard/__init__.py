"""Where a result would rank among RobustBench-style entries, from a shipped, dated snapshot.

``robustbench_snapshot.json`` holds CIFAR-10 and CIFAR-100 ℓ∞ (eps = 8/255) entries, every one
with its provenance: robustbench 1.1.1 installs no ``model_info`` files, so the numbers are
copied from the comparison tables of the seed papers (which quote RobustBench) and from those
papers' own results.  The snapshot is a frozen reference, not the live leaderboard.
"""
from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Optional, Union

__all__ = ["SNAPSHOT_FILE", "load_snapshot", "entries", "rank", "format_rank", "format_table"]

SNAPSHOT_FILE = "robustbench_snapshot.json"
_EPS_TOL = 1e-6
_FULL_TEST = {"cifar10": 10000, "cifar100": 10000}


def load_snapshot(path=None) -> dict:
    """The shipped snapshot (or a JSON file of the same shape)."""
    if path is not None:
        return json.loads(Path(path).read_text())
    return json.loads((resources.files("rb_labelrefine.leaderboard") / SNAPSHOT_FILE).read_text())


def entries(snapshot: dict, dataset: str, threat_model: str) -> tuple[list[dict], float]:
    """``(entries, eps)`` of one benchmark, with a clear error for a missing one."""
    bench = snapshot.get("benchmarks", {})
    if dataset not in bench or threat_model not in bench[dataset]:
        have = [f"{d}/{t}" for d, tms in bench.items() for t in tms]
        raise ValueError(f"the snapshot has no {dataset}/{threat_model} entries; available: {have}")
    b = bench[dataset][threat_model]
    return list(b["entries"]), float(b["eps"])


def _as_float(v) -> Optional[float]:
    if v is None or v == "":
        return None
    return float(v)


def _percent(v, field: str) -> Optional[float]:
    """An accuracy in percent: a finite number in [0, 100] (NaN or 150 would rank first)."""
    if v is None or v == "":
        return None
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number (percent), got {v!r}") from None
    if not (math.isfinite(out) and 0.0 <= out <= 100.0):
        raise ValueError(f"{field} must be a percentage in [0, 100], got {v!r}")
    return out


def _parse_input(result) -> dict:
    """Accept a run_autoattack/benchmark result, a model_info dict / JSON path, or a ModelInfo."""
    if isinstance(result, (str, Path)):
        result = json.loads(Path(result).read_text())
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    if not isinstance(result, dict):
        raise TypeError("rank() takes a result dict, a model_info dict/ModelInfo, or a path to a model_info JSON")
    aa = result.get("autoattack_acc", result.get("robust_acc"))
    if aa is None:
        raise ValueError("the input has no robust accuracy ('autoattack_acc' of model_info or 'robust_acc' "
                         "of an AutoAttack result)")
    eps = result.get("eps")
    if isinstance(eps, str) and "/" in eps:
        num, den = eps.split("/", 1)
        try:
            eps = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps must be a number or a fraction like 8/255, got {eps!r}") from None
    return {
        "name": result.get("name") or result.get("model_name") or "your model",
        "autoattack_acc": _percent(aa, "the AutoAttack accuracy"),
        "clean_acc": _percent(result.get("clean_acc"), "the clean accuracy"),
        "extra_data": result.get("additional_data", result.get("extra_data")),
        "eps": _as_float(eps),
        "norm": result.get("norm") or result.get("threat_model"),
        "n": result.get("n"),
        "standard": result.get("standard"),
        "dataset": result.get("dataset"),
    }


def _key(e) -> tuple:
    return (-float(e["autoattack_acc"]), -(e.get("clean_acc") or 0.0))


def _public(e: dict) -> dict:
    keep = ("id", "robustbench_model", "paper", "architecture", "clean_acc", "autoattack_acc", "extra_data",
            "on_robustbench", "source")
    return {k: e.get(k) for k in keep}


def _position(you: dict, pool: list[dict], neighbours: int) -> dict:
    ordered = sorted(pool, key=_key)
    higher = [e for e in ordered if e["autoattack_acc"] > you["autoattack_acc"]]
    tied = [e for e in ordered if e["autoattack_acc"] == you["autoattack_acc"]]
    lower = [e for e in ordered if e["autoattack_acc"] < you["autoattack_acc"]]
    return {
        "position": len(higher) + 1,          # ties share the position
        "of": len(ordered) + 1,               # the field including you
        "tied_with": [_public(e) for e in tied],
        "above": [_public(e) for e in higher[-neighbours:]] if neighbours else [],
        "below": [_public(e) for e in lower[:neighbours]] if neighbours else [],
    }


def rank(result_or_model_info, dataset: str = "cifar10", threat_model: str = "Linf",
         extra_data: Optional[bool] = None, *, snapshot: Optional[dict] = None, neighbours: int = 2,
         only_robustbench: bool = False) -> dict:
    """Position of a result among the snapshot's entries, with and without extra-data entries.

    Args:
        result_or_model_info: a :func:`~rb_labelrefine.evaluation.run_autoattack` or ``benchmark``
            result (``robust_acc``, percent), an exported ``model_info`` dict / JSON path /
            ``robustbench.utils.ModelInfo`` (``autoattack_acc``).
        extra_data: whether *your* model used extra training data (default: the input's
            ``additional_data``, else False).  A model with extra data gets no "without extra
            data" ranking.
        neighbours: how many entries above and below to report.
        only_robustbench: rank only entries known to be on RobustBench (``on_robustbench`` true).

    Raises ``ValueError`` when the input's threat model or eps differ from the benchmark's.
    """
    snapshot = snapshot or load_snapshot()
    pool, eps = entries(snapshot, dataset, threat_model)
    you = _parse_input(result_or_model_info)
    if you["norm"] is not None and you["norm"] != threat_model:
        raise ValueError(f"the result is for {you['norm']}, not {threat_model}: it cannot be ranked there")
    if you["eps"] is not None and abs(you["eps"] - eps) > _EPS_TOL:
        raise ValueError(f"the result was measured at eps={you['eps']:.6g}, the {dataset}/{threat_model} leaderboard "
                         f"uses eps={eps:.6g}; the numbers are not comparable")
    if you["dataset"] is not None and you["dataset"] != dataset:
        raise ValueError(f"the result is for {you['dataset']}, not {dataset}")
    if extra_data is None:
        extra_data = bool(you["extra_data"]) if you["extra_data"] is not None else False
    if only_robustbench:
        pool = [e for e in pool if e.get("on_robustbench") is True]
    caveats = []
    full = _FULL_TEST.get(dataset)
    if you["n"] is not None and full and you["n"] < full:
        caveats.append(f"measured on {you['n']} test points, the leaderboard on {full:,}")
    if you["standard"] is False:
        caveats.append("not AutoAttack standard: the robust accuracy is an upper bound")
    if you["eps"] is None:
        caveats.append(f"the input does not say its eps; assumed {snapshot['benchmarks'][dataset][threat_model].get('eps_str', eps)}")
    unknown = [e for e in pool if e.get("extra_data") is None]
    without = None
    if not extra_data:
        without = _position(you, [e for e in pool if e.get("extra_data") is False], neighbours)
        without["excluded_unknown_extra_data"] = len(unknown)
    return {
        "you": {k: you[k] for k in ("name", "autoattack_acc", "clean_acc", "n")} | {"extra_data": extra_data},
        "dataset": dataset, "threat_model": threat_model, "eps": eps,
        "snapshot_date": snapshot.get("snapshot_date"),
        "only_robustbench": only_robustbench,
        "all": _position(you, pool, neighbours),
        "without_extra_data": without,
        "caveats": caveats,
    }


def _line(e: dict) -> str:
    name = e.get("robustbench_model") or e.get("paper")
    clean = "n/a" if e.get("clean_acc") is None else f"{e['clean_acc']:.2f}%"
    extra = " [extra data]" if e.get("extra_data") else ""
    return f"{e['autoattack_acc']:.2f}% AA, {clean} clean  {name} ({e.get('architecture')}){extra}"


def format_rank(r: dict) -> str:
    """``rank()``'s answer as text."""
    you = r["you"]
    clean = "" if you["clean_acc"] is None else f", clean {you['clean_acc']:.2f}%"
    lines = [f"{you['name']}: AutoAttack {you['autoattack_acc']:.2f}%{clean} on {r['dataset']} "
             f"{r['threat_model']} (snapshot of {r['snapshot_date']})"]
    sections = [("all entries", r["all"])]
    if r["without_extra_data"] is not None:
        sections.append(("without extra data", r["without_extra_data"]))
    else:
        lines.append("  (your model uses extra data: no 'without extra data' ranking)")
    for title, pos in sections:
        tie = f", tied with {len(pos['tied_with'])}" if pos["tied_with"] else ""
        lines.append(f"  {title}: #{pos['position']} of {pos['of']}{tie}")
        for e in pos["above"]:
            lines.append(f"    above: {_line(e)}")
        for e in pos["below"]:
            lines.append(f"    below: {_line(e)}")
        if pos.get("excluded_unknown_extra_data"):
            lines.append(f"    ({pos['excluded_unknown_extra_data']} entries with unknown extra-data status left out)")
    for c in r["caveats"]:
        lines.append(f"  caveat: {c}")
    return "\n".join(lines)


def format_table(snapshot: Optional[dict] = None, dataset: str = "cifar10", threat_model: str = "Linf",
                 top: Optional[int] = 20) -> str:
    """The snapshot's entries for one benchmark as a Markdown table, best first."""
    snapshot = snapshot or load_snapshot()
    pool, eps = entries(snapshot, dataset, threat_model)
    ordered = sorted(pool, key=_key)[:top] if top else sorted(pool, key=_key)
    lines = [f"{dataset} {threat_model} (eps={snapshot['benchmarks'][dataset][threat_model].get('eps_str', eps)}), "
             f"snapshot of {snapshot.get('snapshot_date')}",
             "",
             "| # | model | paper | architecture | clean | AutoAttack | extra data |",
             "|---|---|---|---|---|---|---|"]
    for i, e in enumerate(ordered, 1):
        clean = "n/a" if e.get("clean_acc") is None else f"{e['clean_acc']:.2f}"
        extra = {True: "yes", False: "no", None: "unknown"}[e.get("extra_data")]
        lines.append(f"| {i} | {e.get('robustbench_model') or '—'} | {e['paper']} | {e.get('architecture')} | {clean} | "
                     f"{e['autoattack_acc']:.2f} | {extra} |")
    return "\n".join(lines)
