"""Issue 23: a RobustBench submission and a Hub upload without hand edits.

WRN and timm exports from the CLI with --model-name/--authors/--link/--venue: model_info filled, eps
as RobustBench writes it, a model-zoo entry in RobustBench's terms that registers itself when
imported so that robustbench.utils.load_model (robustbench 1.1.1, installed) loads the export, the
filled "[New Model]" text, no local path in any file; `eval` on an export directory or its
.safetensors; `export --push-to-hub` through a stubbed huggingface_hub client (no hub here)."""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _extras import need

need("robustbench")

from rb_labelrefine import cli
from rb_labelrefine.config import Config, dump_config
from rb_labelrefine.export import load_exported
from rb_labelrefine.export.publish import eps_text, portable
from rb_labelrefine.models import build_model
from rb_labelrefine.runs import write_weights

REPO = Path(__file__).resolve().parents[1]
CIFAR = {"name": "cifar10", "num_classes": 10, "channels": 3, "image_size": 32,
         "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
DIGITS = {"name": "digits", "num_classes": 10, "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4]}
META = ["--model-name", "Annealing Self-Distillation, my run", "--authors", "A. Author, B. Author",
        "--link", "https://example.org/paper", "--venue", "ICLR 2024"]


def _make_run(run_dir: Path, arch: str, kwargs=None, info=CIFAR, eps=8 / 255, norm="Linf"):
    """A run directory in the trainer's layout whose config and metadata name local paths."""
    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.data.name, cfg.model.arch, cfg.model.kwargs = info["name"], arch, dict(kwargs or {})
    cfg.data.root = str(run_dir.parent / "datasets" / "cifar-10")     # a local path that must not leak
    cfg.attack.eps, cfg.attack.norm = eps, norm
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    model = build_model(arch, num_classes=info["num_classes"], in_channels=info["channels"],
                        image_size=info["image_size"], mean=info["mean"], std=info["std"], **(kwargs or {})).eval()
    data_info = {**info, "source": str(run_dir.parent / "datasets" / "cifar-10")}
    for which in ("best", "final"):
        write_weights(model, run_dir / f"{which}.safetensors",
                      {"arch": arch, "epoch": 3, "data_info": json.dumps(data_info)})
    return model


def _export(capsys, run, out, *extra):
    rc = cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--name", "Tester2026_Export", *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    made = {}
    for key, arch, kwargs in (("wrn", "wrn", {"depth": 10, "width": 1}), ("timm", "timm:test_efficientnet", {})):
        if key == "timm":
            need("timm")
        model = _make_run(tmp / key / "run", arch, kwargs)
        out = tmp / key / "out"
        rc = cli.main(["export", "--checkpoint", str(tmp / key / "run"), "--out", str(out),
                       "--name", f"Tester2026_{key.upper()}", *META])
        assert rc == 0
        made[key] = {"tmp": tmp / key, "out": out, "model": model, "name": f"Tester2026_{key.upper()}"}
    return made


@pytest.mark.parametrize("key", ["wrn", "timm"])
def test_model_info_is_filled_and_eps_is_robustbenchs(exports, key):
    e = exports[key]
    info = json.loads((e["out"] / "model_info" / "cifar10" / "Linf" / f"{e['name']}.json").read_text())
    assert info["name"] == "Annealing Self-Distillation, my run" and info["authors"] == "A. Author, B. Author"
    assert info["link"] == "https://example.org/paper" and info["venue"] == "ICLR 2024"
    assert info["eps"] == "8/255" and info["dataset"] == "cifar10"


def test_eps_as_robustbench_writes_it():
    assert [eps_text(8 / 255, "Linf"), eps_text(4 / 255, "Linf"), eps_text(0.5, "L2"), eps_text(0.031, "Linf"),
            eps_text(0.1, "Linf"), eps_text(1e-5, "L2")] == ["8/255", "4/255", "0.5", "0.031", "0.1", "0.00001"]
    with pytest.raises(ValueError):
        eps_text(0, "Linf")


@pytest.mark.parametrize("key, module, callee", [("wrn", "robustbench.model_zoo.architectures.wide_resnet",
                                                  "WideResNet"), ("timm", "timm", "create_model")])
def test_the_entry_is_in_robustbenchs_terms(exports, key, module, callee):
    e = exports[key]
    source = (e["out"] / "model_zoo_entry.py").read_text()
    code = source.split('"""')[-1]
    assert "rb_labelrefine" not in code
    mods = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert all(m.startswith("robustbench.") or m == "timm" for m in mods) and module in mods
    assert f"{callee}(" in code
    card = (e["out"] / "README.md").read_text()
    assert "cannot go into a RobustBench pull request" not in card and "RobustBench has no" not in card
    if key == "timm":
        assert "create_model('test_efficientnet', num_classes=10, in_chans=3, pretrained=False)" in code


@pytest.mark.parametrize("key", ["wrn", "timm"])
def test_importing_the_entry_registers_it_and_load_model_loads_the_export(exports, key):
    """How a reviewer checks an export: import the file (a fresh interpreter, in the export
    directory), then robustbench.utils.load_model(model_name=..., model_dir=..., dataset=..., threat_model=...)."""
    e = exports[key]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.save(x, e["tmp"] / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, ".")
        import model_zoo_entry
        from robustbench.utils import load_model
        model = load_model(model_name={e['name']!r}, model_dir="models", dataset="cifar10", threat_model="Linf")
        with torch.no_grad():
            torch.save(model(torch.load({str(e['tmp'] / 'x.pt')!r})), {str(e['tmp'] / 'y.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=e["out"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same summation order as the child's (2 threads vs 1 differ in the last bit)
    try:
        with torch.no_grad():
            mine = e["model"](x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.load(e["tmp"] / "y.pt"), mine, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["wrn", "timm"])
def test_the_new_model_issue_is_filled(exports, key):
    e = exports[key]
    text = (e["out"] / "ROBUSTBENCH_NEW_MODEL.md").read_text()
    assert text.splitlines()[0] == f"[New Model] {e['name']}"
    for line in ("- **Paper Title**: Annealing Self-Distillation, my run", "- **Paper URL**: https://example.org/paper",
                 "- **Paper authors**: A. Author, B. Author", "- **Threat Model**: Linf", "- **eps**: 8/255",
                 "- **Additional data**: false", "- **Robust accuracy**: not measured",
                 "- [x] I use an architecture that is included among"):
        assert line in text, line
    manifest = json.loads((e["out"] / "export.json").read_text())
    assert manifest["files"]["new_model_issue"] == "ROBUSTBENCH_NEW_MODEL.md"


@pytest.mark.parametrize("key", ["wrn", "timm"])
def test_no_exported_file_contains_a_local_path(exports, key):
    e = exports[key]
    needles = [str(e["tmp"]), str(e["tmp"].resolve()), str(REPO), os.path.expanduser("~") + "/"]
    files = [p for p in e["out"].rglob("*") if p.is_file()]
    assert len(files) >= 7
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n.encode() not in data, (p, n)
    manifest = json.loads((e["out"] / "export.json").read_text())
    assert manifest["source"]["run_dir"] == "run" and manifest["source"]["weights"] == "best.safetensors"
    card = (e["out"] / "README.md").read_text()
    assert "root: cifar-10" in card


def test_portable_keeps_only_names():
    assert portable({"root": "/data/cifar", "aux": "~/gen/1m.npz", "rel": "./x/y", "n": 3, "s": "cifar10",
                     "l": ["C:\\data\\set"]}) == {"root": "cifar", "aux": "1m.npz", "rel": "y", "n": 3,
                                                  "s": "cifar10", "l": ["set"]}


def test_an_export_refuses_to_write_a_local_path(tmp_path, monkeypatch):
    from rb_labelrefine.export import robustbench_export as rx

    _make_run(tmp_path / "run", "wrn", {"depth": 10, "width": 1})
    monkeypatch.setattr(rx, "portable", lambda v: v)          # the guard, if the stripping ever fails
    with pytest.raises(RuntimeError, match="local paths"):
        rx.export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("--model-name", "two\nlines"), ("--authors", ""), ("--venue", "x" * 501)])
def test_model_info_fields_are_checked(tmp_path, capsys, field, value):
    _make_run(tmp_path / "run", "wrn", {"depth": 10, "width": 1})
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"), field, value])
    assert rc == 2 and field in capsys.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- eval of an export

def test_eval_accepts_an_export_directory_and_its_safetensors(tmp_path, capsys):
    need("sklearn")                                   # the digits test split
    model = _make_run(tmp_path / "run", "mlp", info=DIGITS, eps=0.05)
    out = _export(capsys, tmp_path / "run", tmp_path / "out")
    st = next(out.glob("*.safetensors"))
    downloaded = tmp_path / "downloads" / st.name                 # e.g. fetched from the Hub, alone
    downloaded.parent.mkdir()
    downloaded.write_bytes(st.read_bytes())
    results = []
    for target in (out, st, downloaded):
        j = tmp_path / f"e{len(results)}.json"
        rc = cli.main(["eval", "--checkpoint", str(target), "--n", "6", "--attacks", "apgd-ce", "--json", str(j)])
        assert rc == 0, capsys.readouterr().err
        results.append(json.loads(j.read_text()))
    for r in results:
        assert r["norm"] == "Linf" and r["eps"] == pytest.approx(0.05) and r["dataset"] == "digits"
        assert r["autoattack"]["n"] == 6
    assert results[0]["autoattack"]["robust_correct"] == results[2]["autoattack"]["robust_correct"]
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_exported(downloaded)(x), model(x))


def test_eval_refuses_a_safetensors_that_is_neither_a_run_nor_an_export(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "other.safetensors")])
    assert rc == 2 and "exporter" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the Hub

class _StubHub:
    """Records what huggingface_hub.HfApi would have been asked (no hub is reachable here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return None


def test_push_to_hub_uploads_the_export(tmp_path, capsys, monkeypatch):
    need("huggingface_hub")
    import huggingface_hub

    stub = _StubHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: stub)
    _make_run(tmp_path / "run", "wrn", {"depth": 10, "width": 1})
    out = tmp_path / "out"
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--name", "Hubbed",
                   "--push-to-hub", "someone/hubbed-wrn", "--private"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw) = stub.calls
    assert (c_name, c_repo, u_name, u_repo) == ("create_repo", "someone/hubbed-wrn", "upload_folder",
                                                "someone/hubbed-wrn")
    assert c_kw["private"] is True and c_kw["exist_ok"] is True and c_kw["repo_type"] == "model"
    assert Path(u_kw["folder_path"]) == out
    manifest = json.loads((out / "export.json").read_text())
    assert set(u_kw["allow_patterns"]) == set(manifest["files"].values()) | {"export.json"}
    assert "README.md" in u_kw["allow_patterns"]
    assert "https://huggingface.co/someone/hubbed-wrn" in captured.out
    assert "https://huggingface.co/someone/hubbed-wrn" in (out / "ROBUSTBENCH_NEW_MODEL.md").read_text()


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "../x", "user/name with space"])
def test_push_to_hub_refuses_a_bad_repo_id_before_any_work(tmp_path, capsys, repo):
    _make_run(tmp_path / "run", "wrn", {"depth": 10, "width": 1})
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                   "--push-to-hub", repo])
    assert rc == 2 and "--push-to-hub" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_push_to_hub_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    _make_run(tmp_path / "run", "wrn", {"depth": 10, "width": 1})
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                   "--push-to-hub", "someone/x"])
    err = capsys.readouterr().err
    assert rc == 2 and "extra [hub]" in err and '"huggingface_hub>=0.20"' in err and not (tmp_path / "out").exists()
