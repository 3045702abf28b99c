"""RobustBench-format export: files, loading through RobustBench itself, model_info, model card,
and refusal of pickled payloads."""
import dataclasses
import json
import os
import pickle
import re
import runpy
import subprocess
import sys
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from _extras import need

need("robustbench")

from rb_labelrefine.config import Config, dump_config, make_method
from rb_labelrefine.data import load_synthetic
from rb_labelrefine.evaluation import run_autoattack
from rb_labelrefine.export import export_run, load_exported, read_pt_state_dict
from rb_labelrefine.models import build_model
from rb_labelrefine.runs import info_to_metadata, write_weights

REPO = Path(__file__).resolve().parents[1]


def _make_run(run_dir: Path, arch="tiny_cnn", method="adr"):
    """A minimal run directory in the trainer's layout: config.yaml + best/final weights."""
    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.data.name, cfg.model.arch, cfg.method = "synthetic", arch, make_method(method)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    _, test, info = load_synthetic(n_train=8, n_test=24)
    models = {}
    for seed, which in ((0, "best"), (1, "final")):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, mean=info.mean, std=info.std).eval()
        write_weights(model, run_dir / f"{which}.safetensors",
                      {"arch": arch, "num_classes": info.num_classes, "dataset": info.name, "epoch": 3 + seed,
                       "data_info": info_to_metadata(info)})
        models[which] = model
    x = torch.stack([test[i][0] for i in range(len(test))])
    return models, x


def _evaluate(model, x):
    with torch.no_grad():
        y = model(x).argmax(1)
    return run_autoattack(model, x, y, version="custom", attacks=["apgd-ce"],
                          attack_params={"apgd.n_iter": 5, "apgd.n_restarts": 1}, n_ex=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    models, x = _make_run(tmp / "run")
    aa = {w: _evaluate(models[w], x) for w in ("best", "final")}
    out = tmp / "out"
    written = export_run(tmp / "run", out, name="Tester2026_ADR_tiny", dataset="cifar10", autoattack=aa)
    return {"tmp": tmp, "out": out, "written": written, "models": models, "x": x, "aa": aa}


def test_export_writes_the_robustbench_layout(exported):
    out, w = exported["out"], exported["written"]
    name = "Tester2026_ADR_tiny"
    assert w["weights_pt"] == out / "models" / "cifar10" / "Linf" / f"{name}.pt"
    assert w["model_info"] == out / "model_info" / "cifar10" / "Linf" / f"{name}.json"
    assert w["safetensors"] == out / f"{name}.safetensors"
    assert w["model_card"] == out / "README.md" and w["zoo_entry"] == out / "model_zoo_entry.py"
    for p in w.values():
        assert Path(p).is_file()
    # a plain state dict of tensors: loads with weights_only=True
    raw = torch.load(w["weights_pt"], map_location="cpu", weights_only=True)
    assert isinstance(raw, dict) and all(torch.is_tensor(v) for v in raw.values())
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["robustbench_loadable"] is True and manifest["which"] == "best"


def test_robustbench_load_model_and_load_exported_reproduce_the_model(exported):
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    out, x, original = exported["out"], exported["x"][:4], exported["models"]["best"]
    name, entry = runpy.run_path(str(exported["written"]["zoo_entry"]))["ENTRY"]
    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    zoo[name] = entry
    try:
        rb_model = load_model(name, model_dir=out / "models", dataset="cifar10", threat_model="Linf")
    finally:
        del zoo[name]
    with torch.no_grad():
        ref = original(x)
        assert torch.equal(rb_model(x), ref)
        for path in (out, exported["written"]["safetensors"], exported["written"]["weights_pt"]):
            assert torch.equal(load_exported(path)(x), ref)


def test_model_info_has_exactly_the_modelinfo_fields(exported):
    from robustbench.utils import ModelInfo

    info = json.loads(exported["written"]["model_info"].read_text())
    assert list(info) == [f.name for f in dataclasses.fields(ModelInfo)]
    best = exported["aa"]["best"]
    assert info["autoattack_acc"] == str(round(best["robust_acc"], 2))
    assert info["clean_acc"] == str(round(best["clean_acc"], 2))
    assert info["dataset"] == "cifar10" and info["eps"] == "8/255"          # as RobustBench's model_info writes it
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert info["authors"] is None and info["link"] is None and info["reported"] is None   # never guessed
    assert "16 test points" in info["footnote"] and "synthetic" in info["footnote"]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_card_front_matter_and_numbers(exported):
    card = exported["written"]["model_card"].read_text()
    fm = _front_matter(card)
    assert fm["license"] and {"adversarial-robustness", "robustbench", "adr"} <= set(fm["tags"])
    assert fm["datasets"] == ["uoft-cs/cifar10"]                  # a Hub dataset id
    result = fm["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "CIFAR-10", "type": "uoft-cs/cifar10", "split": "test"}
    metrics = result["metrics"]
    best, final = exported["aa"]["best"], exported["aa"]["final"]
    assert [m["value"] for m in metrics] == [round(best["clean_acc"], 2), round(best["robust_acc"], 2)]
    # a metric's name says what makes it comparable: threat model and point count
    assert [m["name"] for m in metrics] == ["Clean accuracy (CIFAR-10 test, 16 test points)",
                                            "AutoAttack (non-standard) robust accuracy (Linf, eps=8/255, 16 test points)"]
    assert "pypi.org" not in card
    assert f"{best['robust_acc']:.2f}%" in card and f"{final['robust_acc']:.2f}%" in card
    assert f"{best['robust_acc'] - final['robust_acc']:+.2f} points" in card      # the best-final gap
    assert "@inproceedings{wu2024annealing" in card and "@inproceedings{madry2018towards" in card
    assert "16 test points, not the full 10,000" in card
    assert "Trained on synthetic, not on cifar10" in card
    assert "not measured (the run directory has no summary.json)" in card


def test_model_card_never_invents_numbers(tmp_path):
    _make_run(tmp_path / "run", arch="mlp", method="sglr")
    written = export_run(tmp_path / "run", tmp_path / "out")     # no evaluations given
    card = written["model_card"].read_text()
    fm = _front_matter(card)
    assert "model-index" not in fm                                 # the Hub rejects an empty results list
    assert not re.search(r"\d+\.\d+%", card)                       # no accuracy anywhere
    assert card.count("not measured") >= 6
    info = json.loads(written["model_info"].read_text())
    assert info["clean_acc"] is None and info["autoattack_acc"] is None
    # a synthetic-data run is exported in the same layout but marked as not loadable by RobustBench
    assert written["weights_pt"].parent == tmp_path / "out" / "models" / "synthetic" / "Linf"
    assert json.loads((tmp_path / "out" / "export.json").read_text())["robustbench_loadable"] is False
    assert "cannot load this export" in card
    x = torch.rand(2, 3, 32, 32)
    assert load_exported(written["weights_pt"])(x).shape == (2, 10)


def test_export_uses_the_runs_own_autoattack_and_training_summary(tmp_path):
    models, x = _make_run(tmp_path / "run", arch="mlp", method="onehot")
    aa = _evaluate(models["final"], x)
    summary = {"best_epoch": 2, "device": "cpu", "torch": torch.__version__, "threads": 1, "train_seconds": 12.5,
               "best": {"val_clean": 91.25, "val_pgd": 61.5, "test_clean": 90.0, "test_pgd": 60.75},
               "final": {"epoch": 4, "val_clean": 92.0, "val_pgd": 58.25, "test_clean": 91.0, "test_pgd": 57.5},
               "autoattack": {"final": aa}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    written = export_run(tmp_path / "run", tmp_path / "out", which="final", dataset="cifar10")
    card = written["model_card"].read_text()
    info = json.loads(written["model_info"].read_text())
    assert info["autoattack_acc"] == str(round(aa["robust_acc"], 2))
    for v in ("91.25%", "61.50%", "58.25%", "57.50%", f"{aa['robust_acc']:.2f}%"):
        assert v in card
    assert "| best | not measured | not measured |" in card       # only final was evaluated
    assert "RBLabelRefine" in written["safetensors"].name and "_AT_mlp" in written["safetensors"].name


class _Payload:
    """Pickling this object writes a marker file when (and only when) it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_given_as_pt_is_refused(exported, tmp_path):
    from robustbench.utils import load_model

    marker = tmp_path / "payload_ran"
    out = tmp_path / "evil"
    pt = out / "models" / "cifar10" / "Linf" / "Evil.pt"
    pt.parent.mkdir(parents=True)
    (out / "export.json").write_text((exported["out"] / "export.json").read_text())
    with open(pt, "wb") as f:
        pickle.dump({"model.mean": _Payload(marker)}, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load"):
        read_pt_state_dict(pt)
    with pytest.raises(ValueError, match="refusing to load"):
        load_exported(pt)
    # RobustBench's own loader relies on torch's weights_only default, which refuses it too
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    zoo["Evil"] = {"model": lambda: torch.nn.Identity(), "gdrive_id": ""}
    try:
        with pytest.raises(pickle.UnpicklingError):
            load_model("Evil", model_dir=out / "models", dataset="cifar10", threat_model="Linf")
    finally:
        del zoo["Evil"]
    # and a payload disguised as safetensors is not a safetensors file
    fake_st = out / "Evil.safetensors"
    fake_st.write_bytes(pt.read_bytes())
    with pytest.raises(ValueError):
        load_exported(fake_st)
    assert not marker.exists()


def test_export_validates_names_and_threat_models(exported, tmp_path):
    run = exported["tmp"] / "run"
    with pytest.raises(ValueError, match=r"unknown RobustBench dataset 'mnist'.*cifar10"):
        export_run(run, tmp_path / "a", dataset="mnist")
    with pytest.raises(ValueError, match=r"unknown RobustBench threat model 'Linfty'.*Linf.*L2"):
        export_run(run, tmp_path / "b", dataset="cifar10", threat_model="Linfty")
    with pytest.raises(ValueError, match="Linf and L2"):
        export_run(run, tmp_path / "c", dataset="cifar10", threat_model="corruptions")
    with pytest.raises(ValueError, match="--name: .bad name!. is not a valid name"):
        export_run(run, tmp_path / "d", dataset="cifar10", name="bad name!")
    with pytest.raises(ValueError, match=r"needs 3x32x32 and 100 classes"):
        export_run(run, tmp_path / "e", dataset="cifar100")
    with pytest.raises(ValueError, match="eps"):   # numbers measured at another radius are not relabelled
        export_run(run, tmp_path / "f", dataset="cifar10", eps=4 / 255, autoattack=exported["aa"])
    with pytest.raises(ValueError, match="measured for Linf"):
        export_run(run, tmp_path / "g", dataset="cifar10", threat_model="L2", autoattack=exported["aa"])


def test_repository_template_matches_the_packaged_one():
    from importlib import resources

    packaged = (resources.files("rb_labelrefine.export") / "templates" / "model_card.md.j2").read_text()
    assert (REPO / "model_cards" / "TEMPLATE.md").read_text() == packaged


def test_model_card_warns_when_cross_entropy_attacks_overstate_robustness():
    """A card says so when APGD-CE leaves >= 2 points more than the whole of AutoAttack (as for
    the ADR models of the Fashion-MNIST benchmark), and stays quiet at the usual ~1 point."""
    from rb_labelrefine.export.model_card import card_context

    def lims(ce, final):
        aa = {"robust_acc": final, "clean_acc": 80.0, "n": 300, "standard": True, "flags": [], "norm": "Linf",
              "eps": 8 / 255, "version": "standard",
              "per_attack": {"apgd-ce": ce, "apgd-t": final, "fab-t": final, "square": final}}
        ctx = card_context(name="m", cfg={"method": {"name": "adr"}}, dataset="cifar10", threat_model="Linf",
                           eps=8 / 255, autoattack={"best": aa, "final": aa})
        return " ".join(ctx["limitations"])

    text = lims(61.33, 56.33)
    assert "Cross-entropy attacks overstate this model's robustness: 61.33% after APGD-CE vs 56.33%" in text
    assert "5.00 points" in text
    assert "Cross-entropy attacks" not in lims(57.0, 56.0)


def _hook_site(tmp_path) -> Path:
    """A site dir holding what the build backend adds to site-packages (.pth + hook module)."""
    spec = importlib.util.spec_from_file_location("rb_build", REPO / "build_backend" / "rb_labelrefine_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    site = tmp_path / "site"
    site.mkdir()
    (site / build.HOOK_MODULE).write_text(Path(build.HOOK_SOURCE).read_text())
    (site / build.PTH_FILE).write_text(build.PTH_LINE)
    return site


def test_the_cards_robustbench_snippet_runs_as_printed(exported, tmp_path):
    card = exported["written"]["model_card"].read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", card, flags=re.S) if "load_model(" in b]
    assert len(blocks) == 1
    snippet = tmp_path / "snippet.py"
    snippet.write_text(blocks[0])
    x = exported["x"][:4]
    torch.save(x, tmp_path / "x.pt")
    # A source checkout has no .pth in site-packages: add the installed one's site dir (what
    # `pip install` puts there) -- the snippet itself runs unchanged, from the export folder.
    driver = (f"import site, runpy, torch; site.addsitedir({str(_hook_site(tmp_path))!r})\n"
              f"ns = runpy.run_path({str(snippet)!r})\n"
              f"torch.save(ns['model'](torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", driver], cwd=exported["out"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), exported["models"]["best"](x))


def test_non_robustbench_cards_print_no_robustbench_snippet(tmp_path):
    _make_run(tmp_path / "run", arch="mlp", method="onehot")
    card = export_run(tmp_path / "run", tmp_path / "out")["model_card"].read_text()
    code = "".join(re.findall(r"```python\n(.*?)```", card, flags=re.S))
    assert "load_exported(" in code and "robustbench" not in code and "load_model(" not in code
    assert "datasets" not in _front_matter(card)                  # synthetic data has no Hub id
