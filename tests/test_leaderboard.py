"""The shipped RobustBench leaderboard snapshot and ranking against it."""
import dataclasses
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _extras import need
from rb_labelrefine.leaderboard import entries, format_rank, format_table, load_snapshot, rank, robust_key

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"id", "paper", "architecture", "clean_acc", "autoattack_acc", "external", "robust_acc", "extra_data",
          "unreliable", "number_forward_passes", "eps", "link", "venue"}


@pytest.fixture(scope="module")
def snap():
    return load_snapshot()


def test_snapshot_is_robustbench_model_info_with_provenance_and_licence(snap):
    datetime.date.fromisoformat(snap["snapshot_date"])
    src = snap["source"]
    assert src["repository"] == "https://github.com/RobustBench/robustbench"
    assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and src["commit_date"]
    assert snap["license"] == "MIT"
    notice = snap["license_notice"]
    assert "Copyright (c) 2020 Francesco Croce" in notice and "Permission is hereby granted" in notice
    sizes = {(d, t): len(entries(snap, d, t)[0]) for d, t in [("cifar10", "Linf"), ("cifar10", "L2"),
                                                             ("cifar100", "Linf")]}
    assert sizes == {("cifar10", "Linf"): 99, ("cifar10", "L2"): 21, ("cifar100", "Linf"): 38}
    assert entries(snap, "cifar10", "L2")[1] == 0.5
    for d, t in sizes:
        rows, eps = entries(snap, d, t)
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert FIELDS <= set(r), r["id"]
            assert isinstance(r["extra_data"], bool) and r["number_forward_passes"] >= 1
            assert r["robust_acc"] == (r["external"] if r["external"] is not None else r["autoattack_acc"])
            assert abs(r["eps_value"] - eps) < 5e-4, r["id"]     # 8/255 is written 0.031 in a few files
    flagged = [r for r in entries(snap, "cifar10", "Linf")[0] if r["external"] is not None]
    assert flagged and any(r["unreliable"] for r in entries(snap, "cifar10", "Linf")[0])


def _robustbench_order(rows):
    """RobustBench's own sort (robustbench.utils.get_key over ACC_FIELDS) on the JSONs as it reads them."""
    utils = need("robustbench.utils")
    from robustbench.model_zoo.enums import ThreatModel

    as_json = [{"id": r["id"], "autoattack_acc": f"{r['autoattack_acc']:.2f}",
                **({"external": f"{r['external']:.2f}"} if r["external"] is not None else {})} for r in rows]
    acc_field = utils.ACC_FIELDS[ThreatModel.Linf]
    return sorted(as_json, key=lambda d: -utils.get_key(d, acc_field)), acc_field, utils.get_key


def test_ltd_ranks_where_robustbench_orders_it(snap):
    from rb_labelrefine.compat.robustbench import import_robustbench

    need("robustbench")
    import_robustbench()
    rows, _ = entries(snap, "cifar10", "Linf")
    theirs, acc_field, get_key = _robustbench_order(rows)
    assert acc_field == ("external", "autoattack_acc")        # an external evaluation comes first
    ltd = next(r for r in rows if r["id"] == "Chen2021LTD_WRN34_10")
    key = get_key(next(d for d in theirs if d["id"] == ltd["id"]), acc_field)
    rb_position = 1 + sum(get_key(d, acc_field) > key for d in theirs)
    r = rank(ltd, "cifar10", "Linf", neighbours=1)
    # the entry itself is in the pool: it ties with itself and takes RobustBench's position
    assert r["all"]["position"] == rb_position
    assert "Chen2021LTD_WRN34_10" in [e["id"] for e in r["all"]["tied_with"]]
    # and the table lists every entry in RobustBench's order of keys
    table = format_table(snap, "cifar10", "Linf", top=None).splitlines()
    ours = [float(ln.split("|")[5]) for ln in table if re.match(r"\| \d+ \|", ln)]
    assert ours == [get_key(d, acc_field) for d in theirs]
    ltd_row = next(i for i, ln in enumerate(table) if "| Chen2021LTD_WRN34_10 |" in ln)
    assert int(table[ltd_row].split("|")[1]) == rb_position


def test_ltd_position_from_the_raw_key_without_robustbench(snap):
    rows, _ = entries(snap, "cifar10", "Linf")
    ltd = next(r for r in rows if r["id"] == "Chen2021LTD_WRN34_10")
    assert ltd["external"] is None and ltd["autoattack_acc"] == 56.94 and ltd["extra_data"] is False
    key = lambda e: e["external"] if e["external"] is not None else e["autoattack_acc"]
    expected = 1 + sum(key(e) > 56.94 for e in rows)
    assert rank({"robust_acc": 56.94, "n": 10000}, "cifar10", "Linf")["all"]["position"] == expected
    # entries with an external evaluation rank by it, not by their (higher) AutoAttack number
    ext = next(e for e in rows if e["external"] is not None and e["external"] < e["autoattack_acc"])
    between = (ext["external"] + ext["autoattack_acc"]) / 2
    above_ids = {e["id"] for e in rows if key(e) > between}
    assert ext["id"] not in above_ids
    assert rank({"robust_acc": between, "n": 10000}, "cifar10", "Linf")["all"]["position"] == len(above_ids) + 1


def test_rank_with_and_without_extra_data(snap):
    rows, _ = entries(snap, "cifar100", "Linf")
    top = rank({"robust_acc": 99.0, "norm": "Linf", "eps": 8 / 255, "n": 10000}, "cifar100", "Linf")
    assert top["all"]["position"] == 1 and top["all"]["above"] == [] and top["comparable"] is True
    best = max(rows, key=robust_key)
    assert top["all"]["below"][0]["id"] == best["id"]

    acc = 31.0
    r = rank({"robust_acc": acc, "clean_acc": 60.0, "n": 10000}, "cifar100", "Linf")
    higher_all = sum(robust_key(e) > acc for e in rows)
    higher_clean = sum(robust_key(e) > acc and not e["extra_data"] for e in rows)
    assert r["all"]["position"] == higher_all + 1 and r["all"]["of"] == len(rows) + 1
    assert r["without_extra_data"]["position"] == higher_clean + 1 < r["all"]["position"]
    assert all(e["extra_data"] is False for e in r["without_extra_data"]["above"] + r["without_extra_data"]["below"])
    text = format_rank(r)
    assert "all entries: #" in text and "without extra data: #" in text

    with_extra = rank({"robust_acc": acc, "n": 10000}, "cifar100", "Linf", extra_data=True)
    assert with_extra["without_extra_data"] is None
    assert "no 'without extra data' ranking" in format_rank(with_extra)


def test_fewer_points_is_not_comparable_with_its_standard_error():
    r = rank({"robust_acc": 50.0, "n": 500, "eps": 8 / 255}, "cifar10", "Linf")
    assert r["comparable"] is False and r["se"] == pytest.approx(100 * (0.25 / 500) ** 0.5)   # 2.24 points
    lo, hi = r["all"]["span_95"]
    assert lo < r["all"]["position"] < hi
    text = format_rank(r)
    assert "NOT COMPARABLE: measured on 500 test points, the leaderboard on 10,000 (standard error ±2.2 points)" in text
    assert f"(±1.96 SE: #{lo}–#{hi})" in text
    full = rank({"robust_acc": 50.0, "n": 10000, "eps": 8 / 255}, "cifar10", "Linf")
    assert full["comparable"] is True and full["se"] is None and full["caveats"] == []
    unknown = rank({"robust_acc": 50.0, "eps": 8 / 255}, "cifar10", "Linf")
    assert unknown["comparable"] is None and "does not say on how many points" in unknown["caveats"][0]


def test_rank_accepts_model_info_eval_json_and_paths(tmp_path):
    mi = {"name": "mine", "dataset": "cifar10", "eps": 8 / 255, "clean_acc": "84.10", "autoattack_acc": "55.20",
          "additional_data": False, "footnote": "Trained with rb_labelrefine (PGD-AT); AutoAttack standard on 64 "
                                                "test points."}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mi))
    ev = {"checkpoint": "run", "which": "best", "dataset": "cifar10", "norm": "Linf", "eps": 8 / 255,
          "autoattack": {"clean_acc": 84.1, "robust_acc": 55.2, "n": 64, "standard": True}}
    results = [rank(mi), rank(path), rank(ev)]
    for r in results:
        assert r["you"]["autoattack_acc"] == 55.20 and r["you"]["clean_acc"] == 84.10 and r["you"]["n"] == 64
        assert r["all"]["position"] == results[0]["all"]["position"] and r["comparable"] is False
    # RobustBench JSONs write eps as a fraction string
    frac = rank({"autoattack_acc": "55.2", "eps": "8/255", "n": 64}, "cifar10")
    assert frac["all"] == results[0]["all"]
    if sys.modules.get("robustbench") or _importable("robustbench"):
        from rb_labelrefine.compat.robustbench import import_robustbench

        import_robustbench()
        from robustbench.utils import ModelInfo

        info = ModelInfo(**{k: v for k, v in mi.items()})
        assert rank(info)["you"]["n"] == 64 and dataclasses.is_dataclass(info)


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_rank_refuses_incomparable_results():
    with pytest.raises(ValueError, match="not comparable"):
        rank({"robust_acc": 50.0, "eps": 0.1}, "cifar10", "Linf")
    with pytest.raises(ValueError, match="L2"):
        rank({"robust_acc": 50.0, "norm": "L2"}, "cifar10", "Linf")
    with pytest.raises(ValueError, match=r"no cifar100/L2 entries; available: \['cifar10/Linf', 'cifar10/L2', "
                                         r"'cifar100/Linf', 'imagenet/Linf'\]"):
        rank({"robust_acc": 50.0}, "cifar100", "L2")
    with pytest.raises(ValueError, match="no robust accuracy"):
        rank({"clean_acc": 80.0}, "cifar10", "Linf")
    with pytest.raises(ValueError, match="cifar100, not cifar10"):
        rank({"robust_acc": 50.0, "dataset": "cifar100"}, "cifar10", "Linf")
    r = rank({"robust_acc": 50.0, "n": 500, "standard": False, "eps": 8 / 255}, "cifar10", "Linf")
    assert len(r["caveats"]) == 2 and r["comparable"] is False
    assert rank({"robust_acc": 60.0, "norm": "L2", "eps": 0.5, "n": 10000}, "cifar10", "L2")["comparable"] is True


def test_format_table(snap):
    text = format_table(snap, "cifar10", "Linf", top=5)
    assert text.count("\n| ") == 6 and snap["source"]["commit"][:12] in text and "| 1 |" in text
    first = max(entries(snap, "cifar10", "Linf")[0], key=robust_key)
    assert f"| 1 | {first['id']} |" in text


def test_snapshot_script_regenerates_from_a_checkout(tmp_path):
    """scripts/update_leaderboard_snapshot.py on a two-entry RobustBench-shaped checkout."""
    root = tmp_path / "robustbench"
    d = root / "model_info" / "cifar10" / "Linf"
    d.mkdir(parents=True)
    base = {"link": "x", "name": "P", "authors": "A", "number_forward_passes": 1, "dataset": "cifar10",
            "venue": "V", "architecture": "WRN", "eps": "8/255", "reported": "1", "footnote": ""}
    (d / "Aaa2020.json").write_text(json.dumps({**base, "additional_data": False, "clean_acc": "80.00",
                                                 "autoattack_acc": "50.00", "unreliable": False}))
    (d / "Bbb2021.json").write_text(json.dumps({**base, "additional_data": True, "clean_acc": "81.00",
                                                 "autoattack_acc": "60.00", "external": "45.00",
                                                 "number_forward_passes": 2}))
    (root / "LICENSE").write_text("The code is MIT.\nCopyright (c) 2020 Someone\n\nMIT License\n\nPermission is "
                                  "hereby granted, free of charge.\n")
    out = tmp_path / "snap.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "update_leaderboard_snapshot.py"), str(root),
                           "--commit", "a" * 40, "--commit-date", "2025-01-01T00:00:00+00:00", "--date", "2026-01-02",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    s = load_snapshot(out)
    rows, eps = entries(s, "cifar10", "Linf")
    assert [r["id"] for r in rows] == ["Aaa2020", "Bbb2021"]      # 50 AutoAttack above 45 external
    assert rows[1]["robust_acc"] == 45.0 and rows[1]["number_forward_passes"] == 2 and rows[1]["extra_data"]
    assert rows[1]["unreliable"] is None and eps == pytest.approx(8 / 255)
    assert s["source"]["commit"] == "a" * 40 and s["snapshot_date"] == "2026-01-02"
    assert s["license_notice"].startswith("Copyright (c) 2020 Someone") and "Permission is hereby" in s["license_notice"]
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "update_leaderboard_snapshot.py"), str(tmp_path),
                          "--commit", "a" * 40, "--commit-date", "x", "--out", str(tmp_path / "o.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no model_info/cifar10/Linf" in bad.stderr
