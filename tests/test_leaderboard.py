"""The shipped leaderboard snapshot and ranking against it."""
import dataclasses
import datetime
import json

import pytest

from rb_labelrefine.leaderboard import entries, format_rank, format_table, load_snapshot, rank

REQUIRED = {"id", "robustbench_model", "paper", "architecture", "clean_acc", "autoattack_acc", "extra_data",
            "extra_data_basis", "on_robustbench", "source", "link"}


@pytest.fixture(scope="module")
def snap():
    return load_snapshot()


def test_snapshot_loads_with_provenance(snap):
    datetime.date.fromisoformat(snap["snapshot_date"])
    assert "model_info" in snap["source"] and "seed" in snap["source"]
    for ds in ("cifar10", "cifar100"):
        rows, eps = entries(snap, ds, "Linf")
        assert eps == pytest.approx(8 / 255) and len(rows) >= 10
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert REQUIRED <= set(r), r["id"]
            assert 0 < r["autoattack_acc"] < r["clean_acc"] <= 100
            assert isinstance(r["extra_data"], bool) and r["extra_data_basis"]
            assert r["source"] and "Table" in r["source"]      # every number says where it was read


def test_snapshot_model_names_exist_in_the_installed_zoo(snap):
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    for ds in ("cifar10", "cifar100"):
        zoo = model_dicts[BenchmarkDataset(ds)][ThreatModel.Linf]
        for r in entries(snap, ds, "Linf")[0]:
            for name in [r["robustbench_model"]] + r.get("robustbench_candidates", []):
                if name is not None:
                    assert name in zoo, (ds, name)


def test_rank_orders_and_separates_extra_data(snap):
    rows, _ = entries(snap, "cifar100", "Linf")
    ordered = sorted(rows, key=lambda r: -r["autoattack_acc"])
    top = rank({"robust_acc": 99.0, "norm": "Linf", "eps": 8 / 255}, "cifar100", "Linf")
    assert top["all"]["position"] == 1 and top["all"]["above"] == []
    assert top["all"]["below"][0]["autoattack_acc"] == ordered[0]["autoattack_acc"]

    # 31.14: below Sehwag (31.15, extra data) and above LTD (31.13)
    r = rank({"robust_acc": 31.14, "clean_acc": 60.0}, "cifar100", "Linf")
    higher_all = sum(e["autoattack_acc"] > 31.14 for e in rows)
    higher_clean = sum(e["autoattack_acc"] > 31.14 and not e["extra_data"] for e in rows)
    assert r["all"]["position"] == higher_all + 1
    assert r["without_extra_data"]["position"] == higher_clean + 1 < r["all"]["position"]
    assert r["all"]["above"][-1]["robustbench_model"] == "Sehwag2021Proxy"
    assert r["all"]["below"][0]["autoattack_acc"] == 31.13
    assert all(e["extra_data"] is False for e in r["without_extra_data"]["above"])
    assert r["all"]["of"] == len(rows) + 1

    with_extra = rank({"robust_acc": 31.14}, "cifar100", "Linf", extra_data=True)
    assert with_extra["without_extra_data"] is None
    assert "no 'without extra data' ranking" in format_rank(with_extra)

    rb_only = rank({"robust_acc": 31.14}, "cifar100", "Linf", only_robustbench=True)
    assert rb_only["all"]["of"] < r["all"]["of"]


def test_rank_accepts_model_info(snap, tmp_path):
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.utils import ModelInfo

    mi = ModelInfo(name="mine", dataset="cifar10", eps=8 / 255, clean_acc="84.10", autoattack_acc="55.20",
                   additional_data=False)
    as_dict = rank(dataclasses.asdict(mi), "cifar10", "Linf")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(dataclasses.asdict(mi)))
    for r in (as_dict, rank(mi, "cifar10", "Linf"), rank(path, "cifar10", "Linf")):
        assert r["you"]["autoattack_acc"] == 55.20 and r["you"]["clean_acc"] == 84.10
        assert r["all"]["position"] == as_dict["all"]["position"]
    text = format_rank(as_dict)
    assert "mine: AutoAttack 55.20%" in text and f"#{as_dict['all']['position']} of" in text
    # RobustBench JSONs sometimes write eps as a fraction string
    assert rank({"autoattack_acc": "55.2", "eps": "8/255"}, "cifar10")["all"] == as_dict["all"]


def test_rank_refuses_incomparable_results(snap):
    with pytest.raises(ValueError, match="not comparable"):
        rank({"robust_acc": 50.0, "eps": 0.1}, "cifar10", "Linf")
    with pytest.raises(ValueError, match="L2"):
        rank({"robust_acc": 50.0, "norm": "L2"}, "cifar10", "Linf")
    with pytest.raises(ValueError, match=r"no cifar10/L2 entries; available: \['cifar10/Linf', 'cifar100/Linf'\]"):
        rank({"robust_acc": 50.0}, "cifar10", "L2")
    with pytest.raises(ValueError, match="no robust accuracy"):
        rank({"clean_acc": 80.0}, "cifar10", "Linf")
    r = rank({"robust_acc": 50.0, "n": 500, "standard": False, "eps": 8 / 255}, "cifar10", "Linf")
    assert len(r["caveats"]) == 2


def test_format_table(snap):
    text = format_table(snap, "cifar10", "Linf", top=5)
    assert text.count("\n| ") == 6 and "snapshot of" in text and "| 1 |" in text
