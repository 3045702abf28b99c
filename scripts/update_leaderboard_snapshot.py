#!/usr/bin/env python3
"""Regenerate ``rb_labelrefine/leaderboard/robustbench_snapshot.json`` from a RobustBench checkout.

    python scripts/update_leaderboard_snapshot.py /path/to/robustbench [--commit SHA --commit-date DATE]

Reads ``model_info/{cifar10,cifar100}/{Linf,L2}/*.json`` and ``model_info/imagenet/Linf/*.json`` (the files RobustBench's leaderboard is
built from; the PyPI wheel ships none) and ``LICENSE``; the commit and its date come from
``git -C PATH`` when PATH is a git checkout, else from ``--commit``/``--commit-date``.  Every
field the ranking needs is kept as RobustBench writes it, plus the ranking key
(``robust_acc``: ``external`` when present, else ``autoattack_acc`` -- ``ACC_FIELDS`` of
``robustbench/utils.py``).  Stdlib only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {"cifar10": ("Linf", "L2"), "cifar100": ("Linf", "L2"), "imagenet": ("Linf",)}
EPS = {"Linf": ("8/255", 8 / 255), "L2": ("0.5", 0.5)}
DATASET_EPS = {("imagenet", "Linf"): ("4/255", 4 / 255)}    # RobustBench's ImageNet threat model
TEST_POINTS = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}   # imagenet: helper_files/imagenet_test_image_ids.txt
OUT = Path(__file__).resolve().parents[1] / "rb_labelrefine" / "leaderboard" / "robustbench_snapshot.json"


def _pct(v, field, path):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise SystemExit(f"{path}: {field} = {v!r} is not a number") from None


def _eps_value(s: str) -> float:
    if "/" in s:
        num, den = s.split("/", 1)
        return float(num) / float(den)
    return float(s)


def read_entry(path: Path) -> dict:
    d = json.loads(path.read_text())
    aa, ext = _pct(d.get("autoattack_acc"), "autoattack_acc", path), _pct(d.get("external"), "external", path)
    if aa is None:
        raise SystemExit(f"{path}: no autoattack_acc")
    eps = str(d.get("eps", ""))
    return {
        "id": path.stem,
        "paper": d.get("name"),
        "authors": d.get("authors"),
        "venue": d.get("venue"),
        "link": d.get("link"),
        "architecture": d.get("architecture"),
        "clean_acc": _pct(d.get("clean_acc"), "clean_acc", path),
        "autoattack_acc": aa,
        "external": ext,
        "robust_acc": ext if ext is not None else aa,   # RobustBench's ranking key
        "reported": _pct(d.get("reported"), "reported", path),
        "extra_data": d.get("additional_data"),
        "number_forward_passes": d.get("number_forward_passes"),
        "unreliable": d.get("unreliable"),
        "eps": eps,
        "eps_value": _eps_value(eps) if eps else None,
        "footnote": d.get("footnote") or None,
    }


def mit_notice(license_text: str) -> str:
    """The MIT part of RobustBench's LICENSE: its copyright line and the permission notice."""
    copyright_line = next(ln for ln in license_text.splitlines() if ln.startswith("Copyright"))
    start = license_text.index("MIT License")
    return copyright_line.strip() + "\n\n" + license_text[start:].strip() + "\n"


def _git(path: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout.strip()


def build(root: Path, commit: str, commit_date: str, today: str) -> dict:
    benchmarks = {}
    for ds, tms in BENCHMARKS.items():
        for tm in tms:
            folder = root / "model_info" / ds / tm
            files = sorted(folder.glob("*.json"))
            if not files:
                continue
            rows = [read_entry(p) for p in files]
            rows.sort(key=lambda e: (-e["robust_acc"], -(e["clean_acc"] or 0.0), e["id"]))
            eps_str, eps = DATASET_EPS.get((ds, tm), EPS[tm])
            benchmarks.setdefault(ds, {})[tm] = {"eps": eps, "eps_str": eps_str, "test_points": TEST_POINTS[ds],
                                                 "entries": rows}
    if "cifar10" not in benchmarks or "Linf" not in benchmarks.get("cifar10", {}):
        raise SystemExit(f"{root}: no model_info/cifar10/Linf/*.json -- is this a RobustBench checkout?")
    return {
        "snapshot_date": today,
        "source": {
            "repository": "https://github.com/RobustBench/robustbench",
            "commit": commit,
            "commit_date": commit_date,
            "files": "model_info/<dataset>/<threat model>/<model id>.json",
        },
        "license": "MIT",
        "license_notice": mit_notice((root / "LICENSE").read_text()),
        "ranking_key": "robust_acc = external if present (an evaluation beyond AutoAttack), else autoattack_acc; "
                       "descending (ACC_FIELDS in robustbench/utils.py, as the leaderboard pages sort); "
                       "ties here: higher clean_acc first, then id",
        "units": "percent on RobustBench's test points (CIFAR: the full 10,000; ImageNet: its fixed 5,000-image "
                 "validation subset): benchmarks.<dataset>.<threat model>.test_points",
        "fields": {
            "id": "RobustBench model id (the JSON's file name; the model-zoo name where the zoo has the model)",
            "external": "robust accuracy from an evaluation stronger than AutoAttack, when RobustBench lists one",
            "extra_data": "additional_data: trained with data beyond the training set",
            "unreliable": "RobustBench marks the evaluation as potentially unreliable (null: not stated)",
            "number_forward_passes": "forward passes per prediction (>1: randomised/ensemble/test-time defences)",
            "eps": "the eps the entry states (a few write 0.031 for 8/255)",
        },
        "benchmarks": benchmarks,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("robustbench", type=Path, help="a RobustBench checkout (its model_info/ and LICENSE)")
    ap.add_argument("--commit", default=None, help="the checkout's commit (default: git rev-parse HEAD)")
    ap.add_argument("--commit-date", default=None, help="its date, ISO (default: from git)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="the snapshot date (default: today)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    commit, commit_date = a.commit, a.commit_date
    if commit is None or commit_date is None:
        try:
            commit = commit or _git(a.robustbench, "rev-parse", "HEAD")
            commit_date = commit_date or _git(a.robustbench, "show", "-s", "--format=%cI", commit)
        except (OSError, subprocess.CalledProcessError):
            ap.error(f"{a.robustbench} is not a git checkout: pass --commit and --commit-date")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        ap.error(f"--commit must be a full 40-hex commit hash, got {commit!r}")
    snap = build(a.robustbench, commit, commit_date, a.date)
    a.out.write_text(json.dumps(snap, indent=1, ensure_ascii=False) + "\n")
    for ds, tms in snap["benchmarks"].items():
        for tm, b in tms.items():
            print(f"{ds} {tm}: {len(b['entries'])} entries", file=sys.stderr)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
