"""A run's record (``benchmark_record.json``): which checkpoints it has, which test points its
AutoAttack covers, and the records taken back from an earlier results file (``--import-results``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from rb_labelrefine.evaluation.paired import as_points

from .plan import CHECKPOINTS, METHODS, NATURAL_PRESET, TEACHER_SEED, run_key


def checkpoints_of(rec_or_dir) -> list[str]:
    """The checkpoints a run has: best and final, and best_pgd_ce when validation used another attack."""
    if isinstance(rec_or_dir, dict):
        return [w for w in CHECKPOINTS if w in rec_or_dir]
    return [w for w in CHECKPOINTS if w != "best_pgd_ce" or (Path(rec_or_dir) / "best_pgd_ce.safetensors").exists()]


def covers(d: dict, aa_n: int, offset: Optional[int] = None) -> bool:
    """A checkpoint's AutoAttack result serves a table at ``aa_n`` points: attacked on exactly
    ``aa_n`` points, or on more with the per-point outcomes kept (the table then uses the first
    ``aa_n``; see :func:`aa_at_n`).  ``offset``: and on the test subset's images from that one on
    (``--aa-offset``; ``None``: wherever they start -- a table pairs each seed on its own points)."""
    n, off = d.get("autoattack_n"), aa_offset(d)
    if offset is not None and off != offset:
        return False
    return n == aa_n or (n is not None and n > aa_n and len(d.get("autoattack_points") or "") == n
                         and len(d.get("pgd20_points") or "") >= off + aa_n)


def aa_offset(d: dict) -> int:
    """Where a checkpoint's AutoAttack points start in the test subset (0: records from before
    ``--aa-offset``)."""
    return int(d.get("autoattack_offset") or 0)


def aa_offsets(records: dict) -> dict:
    """``{offset: [run keys]}`` of the runs whose AutoAttack points do not start at the test
    subset's first image (empty when all do)."""
    out = {}
    for k, r in sorted(records.items()):
        offs = {aa_offset(r[w]) for w in checkpoints_of(r) if r[w].get("autoattack") is not None}
        for o in offs - {0}:
            out.setdefault(str(o), []).append(k)
    return out


def first_points(d: dict, aa_n: int) -> dict:
    """A checkpoint attacked on N > aa_n points, cut to the first aa_n: AutoAttack and the PGD-20
    on the AutoAttack points recomputed from the per-point outcomes.  (AutoAttack treats points
    independently, but its random starts are drawn per batch, so these equal an attack on aa_n
    points in distribution, not bit for bit; AutoAttack's per-stage numbers are not known for the
    subset: recomputed from the per-stage per-point outcomes where those were kept, else dropped.)"""

    off = aa_offset(d)
    aa = d["autoattack_points"][:aa_n]
    pg = d["pgd20_points"][off:off + aa_n]
    out = {k: v for k, v in d.items() if k not in ("autoattack_per_attack",)}
    out.update({"autoattack_points": aa, "autoattack": 100.0 * float(as_points(aa).mean()),
                "pgd20_aa_points": 100.0 * float(as_points(pg).mean()), "autoattack_n": aa_n,
                "autoattack_first_of": d["autoattack_n"],
                "autoattack_all": d.get("autoattack")})
    if d.get("autoattack_stage_points"):
        out["autoattack_stage_points"] = {k: v[:aa_n] for k, v in d["autoattack_stage_points"].items()}
        # robust accuracy after each stage, from AutoAttack's own per-point flags of that stage
        # (what its per-attack numbers are on all points), for the first aa_n points
        out["autoattack_per_attack"] = {k: 100.0 * float(as_points(v).mean())
                                        for k, v in out["autoattack_stage_points"].items() if k != "clean"}
    return out


def aa_at_n(rec: dict, aa_n) -> dict:
    """``rec`` with the AutoAttack fields of a checkpoint attacked at another n blanked out (a
    table mixes no sample sizes; such runs count as not attacked yet) -- except a checkpoint
    attacked on more points with its per-point outcomes: cut to the first ``aa_n``."""
    if aa_n is None:
        return rec
    rec = dict(rec)
    for which in checkpoints_of(rec):
        if rec[which].get("autoattack_n") not in (None, aa_n) and covers(rec[which], aa_n):
            rec[which] = first_points(rec[which], aa_n)
        elif rec[which].get("autoattack_n") not in (None, aa_n):
            rec[which] = {k: v for k, v in rec[which].items() if not k.startswith("autoattack")
                          and k != "pgd20_aa_points"}
    return rec


def no_points(d: dict) -> dict:
    """A checkpoint's results without the per-point strings (those live under "per_point")."""
    return {k: v for k, v in d.items() if not k.endswith("_points") or k == "pgd20_aa_points"}


TEACHER_OVERRIDES = ("method.teacher=", "method.robust_teacher=", "method.standard_teacher=")


def runs_field(records: dict) -> dict:
    """The results file's ``runs``: each run's whole record without its per-point strings (those
    are under ``per_point``) -- what ``import_results`` takes back when the run directories are gone."""
    return {k: {**{f: v for f, v in r.items() if f not in CHECKPOINTS and f != "reused"},
                **{w: no_points(r[w]) for w in checkpoints_of(r)}} for k, r in sorted(records.items())}


def norm_overrides(ov) -> list:
    """Overrides with the teacher run paths cut to the run's name (a results file written with
    another ``--out`` names the same teachers under another folder)."""
    return [o.split("=", 1)[0] + "=" + Path(o.split("=", 1)[1]).name if o.startswith(TEACHER_OVERRIDES) else o
            for o in ov]


def restore_all_points(d: dict) -> dict:
    """A checkpoint as the table stored it (``first_points``: cut to the table's n) with its
    per-point outcomes on all N attacked points: back to N points (the table cuts it again)."""
    n_all = d.get("autoattack_first_of")
    if not n_all or len(d.get("autoattack_points") or "") != n_all:
        return d
    d = {k: v for k, v in d.items() if k != "autoattack_first_of"}
    d["autoattack_n"] = n_all
    if "autoattack_all" in d:
        d["autoattack"] = d.pop("autoattack_all")
    return d


def malformed(rec: dict, legacy: bool = False) -> Optional[str]:
    """Why an imported record cannot be used as one (``None``: it can): the types the table relies on."""
    num = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    if type(rec.get("seed")) is not int or not isinstance(rec.get("method"), str):
        return "seed / method"
    ov = rec.get("overrides")
    if not legacy and not (isinstance(ov, list) and all(isinstance(o, str) for o in ov)):
        return "overrides are not a list of strings"
    for w in checkpoints_of(rec):
        d = rec[w]
        if not isinstance(d, dict):
            return f"{w} is not an object"
        for f in ("clean", "pgd20", "autoattack", "pgd20_aa_points", "epoch", "val_pgd10", "autoattack_n"):
            if not num(d.get(f)):
                return f"{w}.{f} is not a number"
        stages = d.get("autoattack_stage_points")
        if stages is not None and not isinstance(stages, dict):
            return f"{w}.autoattack_stage_points is not an object"
        pts = [d.get(f) for f in ("clean_points", "pgd20_points", "autoattack_points")] + list((stages or {}).values())
        if any(v is not None and (not isinstance(v, str) or v.strip("01")) for v in pts):
            return f"{w}: per-point outcomes are not 0/1 strings"
    if not isinstance(rec.get("curve") or [], list) or not all(isinstance(c, dict) for c in rec.get("curve") or []):
        return "curve"
    return None


def import_results(path: Path, jobs: list, p: dict, out: Path, train_only: bool = False,
                   keep_teachers: bool = False, prefer=()):
    """Finished runs from a results JSON this script wrote (e.g. the committed table), for the runs
    of ``jobs`` that have no record in their own directory -- run directories do not outlive a
    machine, the results file does.  Returns ``(records, notes)``.

    Full records (``runs`` in files written since this option exists) are taken as they are once
    their overrides equal the job's; from older files (no ``runs``) the per-seed results and the
    per-point outcomes are put back together after checking the file's setup against the preset
    (their per-seed curves were not kept: the method's mean +- std curve over those seeds is pooled
    exactly with the other seeds' in ``aggregate``).  A run is imported only when it is complete for this invocation (AutoAttack on
    ``p["aa_n"]`` points with the preset's suite on every checkpoint, unless ``train_only``): its
    weights are not in the file, so nothing can be added to it.  A teacher is not imported while
    a run that trains from its weights still has to be trained (``keep_teachers``: nothing will be
    trained, e.g. ``--report-only``); ``prefer``: run keys imported even where their own directory
    has a record (``--prefer-imported``).  The data is read with ``json``; a run whose fields have
    the wrong types or whose per-point outcomes are not 0/1 strings is skipped with the reason
    (``malformed``); nothing in it is executed, and no path in it is opened."""
    res, provenance = _read_results_file(path, p, jobs)
    s = res["setup"]
    legacy = "runs" not in res
    # the per-run results, as dicts of the record's shape (without the per-point strings)
    found = {}
    obj = lambda x: x if isinstance(x, dict) else {}  # noqa: E731   (a wrong type reads as absent)
    pp = lambda key, w: obj(obj(res["per_point"].get(key)).get(w))  # noqa: E731
    if not legacy:
        if not isinstance(res["runs"], dict):
            raise SystemExit(f"error: --import-results {path}: 'runs' is not an object")
        found = {k: dict(v) for k, v in res["runs"].items() if isinstance(v, dict)}
    else:
        found = _legacy_runs(res, provenance)
    records, notes = {}, []
    for j in jobs:
        key = j["key"]
        rec = found.get(key)
        if rec is None:
            continue
        if (Path(j["out_dir"]) / "benchmark_record.json").exists() and key not in prefer:
            notes.append(f"{key}: its own run directory has a record; that one is used")
            continue
        if not legacy:
            for w in CHECKPOINTS:
                if isinstance(rec.get(w), dict):
                    rec[w] = {**rec[w], **pp(key, w)}
        why = _why_not_imported(rec, j, s, legacy, p, train_only, path)
        if why:
            notes.append(f"{key}: {why}")
            continue
        # (a run the file had imported itself keeps where it came from: the file it was trained for)
        rec["imported"] = rec.get("imported") or {**provenance, "legacy": legacy}
        records[key] = rec
    # a teacher's weights are needed while a run that trains from them still has to be trained
    for j in ([] if keep_teachers else jobs):
        if j["key"] not in records and not (Path(j["out_dir"]) / "benchmark_record.json").exists():
            for d in j["deps"]:
                if records.pop(d, None) is not None:
                    notes.append(f"{d}: not imported -- {j['key']} trains from its weights, so it is trained again")
    if records:
        notes.append(f"imported {len(records)} finished runs from {path} (sha256 {provenance['sha256'][:12]}, "
                     f"commit {provenance['commit']}): {', '.join(sorted(records))}")
    return records, notes


def _read_results_file(path: Path, p: dict, jobs: list) -> tuple[dict, dict]:
    """The results file (JSON, written by this script with the preset's settings) and where it came from."""
    raw = Path(path).read_bytes()
    try:
        res = json.loads(raw)
    except ValueError as exc:
        raise SystemExit(f"error: --import-results {path}: not JSON ({exc})")
    if not isinstance(res, dict) or not isinstance(res.get("per_point"), dict) or not isinstance(
            res.get("setup"), dict):
        raise SystemExit(f"error: --import-results {path}: not a results file of this script "
                         "(no 'setup' / 'per_point')")
    s = res["setup"]
    want = {"train_subset": p["train_subset"], "val_size": p["val_size"], "test_subset": p["test_subset"],
            "curve_n": p["curve_n"], "test_every": p["test_every"], "epochs": p["epochs"],
            "milestones": p["milestones"], "batch_size": p["batch_size"],
            "val_selection": p.get("val_attack", "pgd_ce"), "aa_suite": p.get("aa_suite", "standard"),
            "device": "cpu" if not jobs else jobs[0].get("device", "cpu")}
    bad = [f"{k}: file {s.get(k)!r}, preset {v!r}" for k, v in want.items() if s.get(k, "cpu" if k == "device"
                                                                                      else None) != v]
    if bad:
        raise SystemExit(f"error: --import-results {path}: written with other settings ({'; '.join(bad)})")
    provenance = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "commit": s.get("commit"),
                  "machine": res.get("machine")}
    return res, provenance


def _legacy_runs(res: dict, provenance: dict) -> dict:
    """The runs of a results file written before ``runs`` was kept, put back together from its
    per-seed results and per-point outcomes."""
    s, found = res["setup"], {}
    obj = lambda x: x if isinstance(x, dict) else {}  # noqa: E731   (a wrong type reads as absent)
    pp = lambda key, w: obj(obj(res["per_point"].get(key)).get(w))  # noqa: E731
    spr = obj(res.get("compute_per_run_min"))
    for m, e in obj(res.get("methods")).items():
        if m not in METHODS or not isinstance(e, dict) or e.get("preset") != METHODS[m]:
            continue
        runs = e["seeds"] if isinstance(e.get("seeds"), list) else [{k: e.get(k) for k in ("seed", "run_dir", "curve_peak",
                                                                       "train_robust_acc", *CHECKPOINTS)
                                                 if k in e}]
        for r in runs:
            if not isinstance(r, dict) or type(r.get("seed")) is not int:
                continue   # (skipped: the job of that seed finds nothing to import)
            key = run_key(m, r["seed"])
            rec = {"key": key, "method": m, "seed": r["seed"], "preset": METHODS[m], "run_dir": r.get("run_dir"),
                   "curve": [], "curve_peak": r.get("curve_peak"),
                   # the file kept the mean +- std curve over its seeds, not each seed's
                   "curve_group": {"id": f"{provenance['sha256'][:12]}:{m}", "n": len(runs),
                                   "curve": e.get("curve") or []},
                   "train_robust_acc": r.get("train_robust_acc") or e.get("train_robust_acc"),
                   "effective_decays": e.get("effective_decays", {}), "swa_start_epoch": e.get("swa_start_epoch"),
                   "eval_model": e.get("eval_model"), "attack_bn_mode": s.get("attack_bn_mode"),
                   "steps_per_epoch": s.get("steps_per_epoch"),
                   "train_seconds": 60 * (obj(spr.get(key)).get("train") or 0), "wall_train_seconds": None,
                   "autoattack_seconds": 60 * (obj(spr.get(key)).get("autoattack") or 0), "threads": 1,
                   "commit": s.get("commit"), "device": s.get("device", "cpu")}
            for w in CHECKPOINTS:
                if isinstance(r.get(w), dict):
                    rec[w] = restore_all_points({**r[w], **pp(key, w)})
            found[key] = rec
    nat = res.get("natural_teacher")
    key = run_key("natural", TEACHER_SEED)
    if isinstance(nat, dict) and key in res["per_point"]:
        best = pp(key, "best")
        found[key] = {"key": key, "method": "natural", "seed": TEACHER_SEED, "preset": NATURAL_PRESET,
                      # (its best checkpoint's numbers were not kept: recomputed from its per-point outcomes)
                      "best": {**{f: 100.0 * v.count("1") / len(v) for f, v in (
                          ("clean", best.get("clean_points")), ("pgd20", best.get("pgd20_points")))
                          if isinstance(v, str) and v}, **best},
                      "final": {**nat, **pp(key, "final")}, "curve": [],
                      "train_seconds": 60 * (obj(spr.get(key)).get("train") or 0), "autoattack_seconds": 0,
                      "commit": s.get("commit"), "device": s.get("device", "cpu")}
    return found


def _why_not_imported(rec: dict, j: dict, s: dict, legacy: bool, p: dict, train_only: bool, path) -> Optional[str]:
    """Why the record ``rec`` of the results file ``path`` cannot stand for job ``j``, or ``None``; a
    legacy record gets the job's overrides."""
    why = malformed(rec, legacy)
    if why:
        return f"malformed in {path} ({why}); not imported"
    if not legacy:
        if norm_overrides(rec.get("overrides") or []) != norm_overrides(j["overrides"]):
            return f"trained with other overrides in {path}; not imported"
    else:
        ov = [o for o in j["overrides"] if not o.startswith(("train.seed=",) + TEACHER_OVERRIDES)]
        if s.get("overrides") != ov or rec.get("preset") != j["preset"]:
            return f"other overrides or preset in {path}; not imported"
        rec["overrides"] = list(j["overrides"])
    if rec.get("method") != j["method"] or rec.get("seed") != j["seed"]:
        return "the file's run is another method or seed; not imported"
    checks = checkpoints_of(rec)
    if not all(isinstance(rec.get(w), dict) and rec[w].get("pgd20_points") for w in ("best", "final")):
        return f"no per-point PGD-20 outcomes in {path}; not imported"
    if j["method"] != "natural" and not train_only and not all(
            rec[w].get("autoattack") is not None and covers(rec[w], p["aa_n"])
            and rec[w].get("autoattack_suite", "standard") == p.get("aa_suite", "standard")
            and rec[w].get("autoattack_points") for w in checks):
        return f"not attacked on {p['aa_n']} points in {path} (its weights are not in the file); not imported"
    return None
