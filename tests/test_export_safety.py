"""Export treats a run directory as untrusted input (issue 12): nothing it holds is executed or
becomes a path outside --out; export never writes into or over a run; a non-empty --out needs
--overwrite, which replaces the whole export in one step; bad inputs end with exit 2, a message
naming the field or file, no traceback and no changed file. Plus the model-zoo entry in
RobustBench's own terms (issue 11)."""
import ast
import hashlib
import json
import os
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _extras import need

need("robustbench")

from rb_labelrefine import cli
from rb_labelrefine.config import Config, dump_config
from rb_labelrefine.export import robustbench_export as rx
from rb_labelrefine.export import export_run, load_exported
from rb_labelrefine.models import build_model, register_model
from rb_labelrefine.models.small import mlp
from rb_labelrefine.runs import write_weights

INFO = {"name": "cifar10", "num_classes": 10, "channels": 3, "image_size": 32,
        "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616], "source": "test"}
SMALL = {"num_classes": 10, "channels": 3, "image_size": 8, "name": "synthetic",
         "mean": [0.5, 0.5, 0.5], "std": [0.22, 0.22, 0.22], "source": "test"}


@register_model(name="test_labelled_mlp")
def _labelled_mlp(num_classes=10, in_channels=3, image_size=32, label: str = "", hidden: int = 4):
    """An architecture with a string argument, so a string from config.yaml reaches the zoo entry."""
    assert isinstance(label, str)
    return mlp(num_classes, in_channels, image_size, hidden=hidden)


def _make_run(run_dir: Path, arch="mlp", kwargs=None, info=None, meta=None, config_edit=None, seed=0):
    """A run directory in the trainer's layout (config.yaml, best/final weights), optionally crafted:
    ``info``/``meta`` replace metadata fields, ``config_edit`` edits the config dict before writing."""
    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.data.name, cfg.model.arch, cfg.model.kwargs = "synthetic", arch, dict(kwargs or {})
    data = yaml.safe_load(dump_config(cfg))
    if config_edit:
        config_edit(data)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    d = dict(INFO if arch != "mlp" else SMALL)
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=d["num_classes"], in_channels=d["channels"], image_size=d["image_size"],
                        mean=d["mean"], std=d["std"], **(kwargs or {})).eval()
    d.update(info or {})
    d = {k: v for k, v in d.items() if v is not KeyError}          # KeyError marks a field to drop
    md = {"arch": arch, "epoch": 3, "data_info": json.dumps(d), **(meta or {})}
    for which in ("best", "final"):
        write_weights(model, run_dir / f"{which}.safetensors", md)
    return model


def _tree(root: Path) -> dict:
    """Every path under ``root`` (symlinks not followed) with its content hash: a before/after snapshot."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def _cli(capsys, *argv) -> tuple:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _marker_payloads(marker: Path) -> list:
    m = str(marker)
    return [f"'); import os; os.system('touch {m}'); ('",
            f'"""; import os; os.system("touch {m}"); """',
            f"\\'\n__import__('os').system('touch {m}')  # "]


# ----------------------------------------------------------------------------- 1. no code from inputs

@pytest.mark.parametrize("where", ["kwargs key", "arch", "data_info.name", "data_info.mean", "epoch",
                                   "data_info.source"])
@pytest.mark.parametrize("payload", range(3))
def test_crafted_run_is_refused_naming_the_field_and_runs_nothing(capsys, tmp_path, where, payload):
    marker = tmp_path / "MARKER"
    p = _marker_payloads(marker)[payload]
    run = tmp_path / "run"
    if where == "kwargs key":
        _make_run(run, config_edit=lambda d: d["model"]["kwargs"].update({p: 1}))
        field = "model.kwargs"
    elif where == "arch":
        _make_run(run, config_edit=lambda d: d["model"].update(arch="mlp" + p))
        field = "model.arch"
    elif where == "epoch":
        _make_run(run, meta={"epoch": p})
        field = "metadata epoch"
    elif where == "data_info.source":
        # not a name: any string is fine here, it only goes into JSON; the export must succeed
        _make_run(run, info={"source": p})
        field = None
    else:
        key = where.split(".")[1]
        _make_run(run, info={key: p if key == "name" else [p, 0.5, 0.5]})
        field = where
    before = _tree(run)
    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "out")
    assert "Traceback" not in err
    if field is None:
        assert rc == 0, err
        assert p in json.loads((tmp_path / "out" / "export.json").read_text())["data_info"]["source"]
    else:
        assert rc == 2, err
        assert field in err and ("best.safetensors" in err or "config.yaml" in err), err
        assert not (tmp_path / "out").exists()
    assert _tree(run) == before
    assert not marker.exists()


@pytest.mark.parametrize("payload", range(3))
def test_a_string_from_the_config_is_written_as_a_literal_that_cannot_break_out(capsys, tmp_path, payload):
    """A payload that is a legal value reaches model_zoo_entry.py only as a string literal: the file
    parses to exactly the data, and even executing it (this test's own export) runs nothing."""
    marker = tmp_path / "MARKER"
    p = _marker_payloads(marker)[payload]
    run = tmp_path / "run"
    _make_run(run, arch="test_labelled_mlp", kwargs={"label": p})
    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "out", "--name", "Crafted")
    assert rc == 0, err
    source = (tmp_path / "out" / "model_zoo_entry.py").read_text()
    entry = rx._read_zoo_entry(source)
    assert entry["kwargs"]["label"] == p and entry["name"] == "Crafted"
    assert entry["imports"]["create_model"] == "rb_labelrefine.models"
    assert not marker.exists()
    runpy.run_path(str(tmp_path / "out" / "model_zoo_entry.py"))["ENTRY"][1]["model"]()
    assert not marker.exists()


def test_the_export_never_executes_the_entry_it_wrote(tmp_path, monkeypatch):
    """The verification loads the .pt through RobustBench from the entry's *data*: an entry file
    that would fail when executed does not affect the export."""
    run = tmp_path / "run"
    _make_run(run, arch="test_labelled_mlp")
    real = rx._zoo_source
    monkeypatch.setattr(rx, "_zoo_source", lambda *a: real(*a) + "raise SystemExit('executed')\n")
    with pytest.raises(ValueError, match="not a plain model-zoo entry"):
        export_run(run, tmp_path / "out")          # the file is checked with ast, not run
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source_edit, why", [
    (lambda s: "import os\n" + s, "expected one assignment"),
    (lambda s: s + "import os\n", "expected one assignment"),
    (lambda s: s.replace("image_size=32", "image_size=__import__('os').system('true')"), "malformed"),
    (lambda s: s.replace("lambda:", "lambda x=print('x'):"), "lambda without arguments"),
    (lambda s: s.replace("image_size=32", "**{}"), r"\*\*kwargs"),
    (lambda s: s.replace("from rb_labelrefine.models import create_model",
                         "from rb_labelrefine.models import create_model as cm"), "import of"),
    (lambda s: s.replace("'gdrive_id'", "'gdrive_id': '', 'x'"), "exactly the keys"),
])
def test_the_entry_reader_accepts_nothing_but_data(tmp_path, source_edit, why):
    run = tmp_path / "run"
    _make_run(run, arch="test_labelled_mlp")
    export_run(run, tmp_path / "out", name="Plain")
    source = (tmp_path / "out" / "model_zoo_entry.py").read_text()
    rx._read_zoo_entry(source)
    with pytest.raises(ValueError, match=why):
        rx._read_zoo_entry(source_edit(source))


def test_literals_are_plain_data_only():
    class Evil(str):
        def __repr__(self):
            return "__import__('os').system('true')"

    assert rx._literal({"a": [1, 2.5, None, True, "x'\"\n"]}, "f") == repr({"a": [1, 2.5, None, True, "x'\"\n"]})
    for bad in (Evil("x"), float("nan"), float("inf"), object(), {1: 2}, b"bytes", {"a": {"b": Evil("y")}}):
        with pytest.raises(ValueError, match="^f"):
            rx._literal(bad, "f")


# ----------------------------------------------------------------------------- 2. writes stay in --out

@pytest.mark.parametrize("evil_name", ["../../evil", "..", "/tmp/evil", "a/b", "evil\\x", ".hidden", ""])
def test_a_name_from_weight_metadata_never_becomes_a_path(capsys, tmp_path, evil_name):
    (tmp_path / "work").mkdir()
    run = tmp_path / "work" / "runs" / "run"
    _make_run(run, info={"name": evil_name})
    before = _tree(tmp_path)
    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "work" / "out")
    assert rc == 2 and "data_info.name" in err and str(run / "best.safetensors") in err, err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before                              # nothing written anywhere
    if evil_name.startswith("/"):
        assert not Path(evil_name).exists()


def test_export_names_are_validated_like_the_cli_name(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    for bad in ("../x", "A" * 101, "x y", "1abc"):
        with pytest.raises(ValueError, match="--name"):
            export_run(run, tmp_path / "out", name=bad)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. never into or over a run

@pytest.fixture
def run_tree(tmp_path):
    run = tmp_path / "runs" / "run"
    _make_run(run)
    (run / "summary.json").write_text(json.dumps({"best_epoch": 2}))
    (tmp_path / "link_to_run").symlink_to(run)
    return tmp_path, run


@pytest.mark.parametrize("out, message", [
    ("{run}", "is the run directory"),
    ("{run}/sub", "is inside the run directory"),
    ("{run}/models/x/..", "is inside the run directory"),
    ("{tmp}/runs", "contains the run directory"),
    ("{tmp}/link_to_run", "is the run directory"),
    ("{tmp}/link_to_run/sub", "is inside the run directory"),
])
@pytest.mark.parametrize("checkpoint", ["{run}", "{run}/best.safetensors", "{tmp}/link_to_run"])
def test_export_never_writes_into_or_over_the_run(capsys, run_tree, out, message, checkpoint):
    tmp, run = run_tree
    before = _tree(tmp)
    fmt = {"run": run, "tmp": tmp}
    rc, err = _cli(capsys, "export", "--checkpoint", checkpoint.format(**fmt), "--out", out.format(**fmt),
                   "--name", "final", "--which", "best")
    assert rc == 2 and "--out" in err and message in err, err
    assert "Traceback" not in err
    assert _tree(tmp) == before                                     # run files byte-identical


def test_overwrite_does_not_lift_the_run_protection(capsys, run_tree):
    tmp, run = run_tree
    before = _tree(tmp)
    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", run, "--name", "final", "--overwrite")
    assert rc == 2 and "is the run directory" in err
    assert _tree(tmp) == before


# ----------------------------------------------------------------------------- 4. --overwrite

def _files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_non_empty_out_needs_overwrite_which_replaces_the_whole_export(capsys, tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    out = tmp_path / "exports" / "m"
    assert _cli(capsys, "export", "--checkpoint", run, "--out", out, "--name", "First")[0] == 0
    (out / "README.md").write_text((out / "README.md").read_text() + "\nMy edits.\n")
    before = _tree(tmp_path)

    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", out, "--name", "Second")
    assert rc == 2 and "--overwrite" in err and "'First'" in err and "edited since it was written: README.md" in err
    assert _tree(tmp_path) == before                                # the edited card survives

    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", out, "--name", "Second", "--which", "final",
                   "--overwrite")
    assert rc == 0, err
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["name"] == "Second" and manifest["which"] == "final"
    # nothing of the first export is left: the files are exactly the new manifest's
    assert _files(out) == set(manifest["files"].values()) | {"export.json"}
    assert not any("First" in f for f in _files(out))
    assert "My edits" not in (out / "README.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]   # no staging or old copies left
    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()        # not mkdtemp's 0700
    assert (out / "Second.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_overwrite_never_replaces_a_directory_that_is_not_an_export(capsys, tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = _tree(tmp_path)
    rc, err = _cli(capsys, "export", "--checkpoint", run, "--out", out, "--overwrite")
    assert rc == 2 and "holds no rb_labelrefine export" in err and str(out) in err
    assert _tree(tmp_path) == before


def test_weights_of_this_run_are_exported_with_their_fingerprint(tmp_path):
    run = tmp_path / "run"
    _make_run(run, meta=_fingerprint(seed=0))
    written = export_run(run, tmp_path / "out", name="M")
    source = json.loads(written["manifest"].read_text())["source"]
    assert source["config_fingerprint"] == _fingerprint(seed=0)["config_fingerprint"]


def test_an_empty_existing_out_is_used(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    (tmp_path / "out").mkdir()
    written = export_run(run, tmp_path / "out", name="M")
    assert written["safetensors"].is_file() and written["manifest"] == tmp_path / "out" / "export.json"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_failed_overwrite_leaves_the_previous_export_intact(tmp_path, monkeypatch, exchange):
    run = tmp_path / "run"
    _make_run(run)
    out = tmp_path / "out"
    export_run(run, out, name="First")
    before = _tree(tmp_path)
    if not exchange:
        monkeypatch.setattr(rx, "_exchange", lambda a, b: False)

    def fail(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rx, "_check_same_outputs", fail)   # late: after every file of the new export is written
    with pytest.raises(OSError, match="No space left"):
        export_run(run, out, name="Second", overwrite=True)
    assert _tree(tmp_path) == before
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(rx, "_exchange", lambda a, b: False)
    export_run(run, out, name="Second", overwrite=True)
    assert json.loads((out / "export.json").read_text())["name"] == "Second"
    assert not (out / "First.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_an_out_filled_during_the_export_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _make_run(run)
    out = tmp_path / "out"
    out.mkdir()
    real = rx._check_same_outputs

    def concurrent_writer(*a):
        (out / "theirs.txt").write_text("another export got here first")
        return real(*a)

    monkeypatch.setattr(rx, "_check_same_outputs", concurrent_writer)
    with pytest.raises(ValueError, match="filled by another process"):
        export_run(run, out, name="M")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_an_unwritable_out_parent_is_found_before_any_work(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _make_run(run)
    monkeypatch.setattr(rx.os, "access", lambda p, mode: Path(p) != tmp_path)
    monkeypatch.setattr(rx, "load_run_config", lambda d: pytest.fail("the run was read before --out was checked"))
    with pytest.raises(PermissionError, match=f"--out: cannot create files in {tmp_path}"):
        export_run(run, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- 5. bad inputs, one table

def _drop(key):
    return {key: KeyError}


BAD_INPUTS = {
    # id: (how to make the case, argv extras, strings stderr must contain)
    "out is a file": (lambda t, run: (t / "file.txt").write_text("keep me"),
                      ["--out", "{t}/file.txt"], ["--out", "file.txt", "is not a directory"]),
    "300-character name": (None, ["--name", "A" * 300], ["--name", "300 characters"]),
    "num_classes missing": (lambda t, run: _remake(run, info=_drop("num_classes")), [],
                            ["best.safetensors", "data_info.num_classes", "missing"]),
    "num_classes negative": (lambda t, run: _remake(run, info={"num_classes": -3}), [],
                             ["best.safetensors", "data_info.num_classes", "-3"]),
    "num_classes huge": (lambda t, run: _remake(run, info={"num_classes": 10 ** 9}), [],
                         ["best.safetensors", "data_info.num_classes", "1000000000"]),
    "std zero": (lambda t, run: _remake(run, info={"std": [0.0, 0.2, 0.2]}), [],
                 ["best.safetensors", "data_info.std", "positive"]),
    "data_info not JSON": (lambda t, run: _remake(run, meta={"data_info": "{oops"}), [],
                           ["best.safetensors", "data_info is not valid JSON"]),
    "symlink-loop out": (lambda t, run: (t / "loop").symlink_to(t / "loop"), ["--out", "{t}/loop"],
                         ["--out", "loop", "cannot be resolved"]),
    "0-byte weights": (lambda t, run: (run / "best.safetensors").write_bytes(b""), [],
                       ["best.safetensors", "is not a valid safetensors file"]),
    "garbage weights": (lambda t, run: (run / "best.safetensors").write_bytes(os.urandom(300)), [],
                        ["best.safetensors", "is not a valid safetensors file"]),
    "weights directory": (lambda t, run: ((run / "best.safetensors").unlink(), (run / "best.safetensors").mkdir()),
                          [], ["best.safetensors"]),
    "weights of another shape": (lambda t, run: _remake(run, kwargs={"hidden": 8}, config_kwargs={}), [],
                                 ["best.safetensors", "does not match mlp", "model.1.weight is (8, 192)",
                                  "(64, 192)"]),
    "kwargs the arch does not take": (lambda t, run: _remake(run, config_kwargs={"depth": 3}), [],
                                      ["config.yaml", "model.kwargs", "cannot be built", "depth"]),
    "config not YAML": (lambda t, run: (run / "config.yaml").write_text("model: [unclosed"), [],
                        ["config.yaml", "not valid YAML"]),
    "summary not an object": (lambda t, run: (run / "summary.json").write_text("[1, 2]"), [],
                              ["summary.json", "JSON object"]),
    "summary accuracy out of range": (
        lambda t, run: (run / "summary.json").write_text(json.dumps(
            {"autoattack": {"best": {"robust_acc": 150.0, "clean_acc": 90.0, "n": 10}}})), [],
        ["summary.json", "autoattack.best.robust_acc", "150"]),
    "checkpoint missing": (lambda t, run: shutil.rmtree(run), [], ["--checkpoint", "does not exist"]),
    "weights of another run": (lambda t, run: _remake(run, meta=_fingerprint(seed=1)), [],
                               ["best.safetensors belongs to another run", "train.seed: 1 in the file, 0 in"]),
}


def _fingerprint(seed: int) -> dict:
    """The fingerprint metadata the trainer writes, for a run like _make_run's but with ``seed``."""
    from rb_labelrefine.config import config_from_dict
    from rb_labelrefine.runs import fingerprint_metadata

    cfg = Config()
    cfg.data.name, cfg.model.arch, cfg.train.seed = "synthetic", "mlp", seed
    return fingerprint_metadata(config_from_dict(yaml.safe_load(dump_config(cfg))))


def _remake(run: Path, info=None, meta=None, kwargs=None, config_kwargs=None):
    """Rewrite ``run`` in place with crafted metadata / weights / config kwargs."""
    shutil.rmtree(run)
    _make_run(run, kwargs=kwargs, info=info, meta=meta,
              config_edit=None if config_kwargs is None else lambda d: d["model"].update(kwargs=config_kwargs))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_export_inputs_exit_2_naming_the_field_and_change_nothing(capsys, tmp_path, case):
    make, extra, expected = BAD_INPUTS[case]
    run = tmp_path / "run"
    _make_run(run)
    if make:
        make(tmp_path, run)
    argv = ["export", "--checkpoint", run] + [a.format(t=tmp_path) for a in extra]
    if "--out" not in extra:
        argv += ["--out", tmp_path / "out"]
    before = _tree(tmp_path)
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("rb-labelrefine: error:"), err
    for s in expected:
        assert s in err, (s, err)
    assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- zoo entry in RobustBench's terms

@pytest.fixture(scope="module")
def wrn_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wrn")
    model = _make_run(tmp / "run", arch="wrn", kwargs={"depth": 10, "width": 1})
    written = export_run(tmp / "run", tmp / "out", name="Tester2026_WRN-10-1")
    return tmp, model, written


def test_a_robustbench_architecture_gets_an_entry_that_imports_only_robustbench(wrn_export):
    _, _, written = wrn_export
    source = written["zoo_entry"].read_text()
    tree = ast.parse(source)
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(isinstance(n, ast.Import) for n in ast.walk(tree))
    assert modules and all(m.startswith("robustbench.model_zoo") for m in modules)   # the architecture + registration
    assert "rb_labelrefine" not in source.split('"""')[-1]                # the code, not the docstring
    entry = rx._read_zoo_entry(source)
    assert entry["callee"] == "WideResNet"
    assert entry["kwargs"] == {"depth": 10, "num_classes": 10, "widen_factor": 1, "dropRate": 0.0}
    assert entry["mean"] == tuple(INFO["mean"]) and entry["std"] == tuple(INFO["std"])
    manifest = json.loads(written["manifest"].read_text())
    assert manifest["robustbench_architecture"] is True
    assert "RobustBench has no" not in written["model_card"].read_text()


def test_robustbench_load_model_with_the_entry_matches_the_packages_loader(wrn_export):
    """The test's own (trusted) export: its entry is executed here, as RobustBench would."""
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    tmp, original, written = wrn_export
    name, entry = runpy.run_path(str(written["zoo_entry"]))["ENTRY"]
    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    zoo[name] = entry
    try:
        rb_model = load_model(name, model_dir=tmp / "out" / "models", dataset="cifar10", threat_model="Linf")
    finally:
        del zoo[name]
    assert type(rb_model).__name__ == "Sequential" and type(rb_model.model).__name__ == "WideResNet"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = original(x)
        assert torch.equal(rb_model(x), ref)
        assert torch.equal(load_exported(tmp / "out")(x), ref)
        assert torch.equal(load_exported(written["weights_pt"])(x), ref)


@pytest.mark.parametrize("arch, kwargs, cls", [("preact_resnet18", {}, "PreActResNet"), ("resnet18", {}, "ResNet"),
                                               ("wrn_28_10", {}, "WideResNet"),
                                               ("wrn", {"depth": 16, "widen_factor": 2, "drop_rate": 0.1},
                                                "WideResNet")])
def test_every_robustbench_architecture_is_described_in_its_own_terms(arch, kwargs, cls):
    """The entry's description builds the same network, key for key, as the package's registry."""
    from rb_labelrefine.data import DataInfo
    from rb_labelrefine.models import create_model

    info = DataInfo("cifar10", 10, 3, 32, tuple(INFO["mean"]), tuple(INFO["std"]), "")
    spec = rx._zoo_spec(arch, kwargs, info)
    assert spec.native and spec.callee == cls
    assert rx._read_zoo_entry(rx._zoo_source("M", "cifar10", "Linf", arch, spec)) == spec.as_read("M", "cifar10", "Linf")
    if arch == "wrn_28_10":
        return                                        # 36M parameters: the description is enough
    net = create_model(arch, num_classes=10, **kwargs)
    built = spec.build()
    assert {k: v.shape for k, v in built.model.state_dict().items()} == \
        {k: v.shape for k, v in net.state_dict().items()}
    assert type(built.model).__name__ == cls


def test_other_architectures_say_robustbench_has_none(tmp_path):
    run = tmp_path / "run"
    _make_run(run, arch="test_labelled_mlp")
    written = export_run(run, tmp_path / "out", name="M")
    source = written["zoo_entry"].read_text()
    assert "RobustBench has no test_labelled_mlp architecture" in source
    assert "RobustBench has no test_labelled_mlp architecture" in written["model_card"].read_text()
    assert json.loads(written["manifest"].read_text())["robustbench_architecture"] is False


def test_a_greyscale_stem_is_not_robustbench_s_architecture():
    from rb_labelrefine.models.robustbench_archs import robustbench_call

    assert robustbench_call("wrn", 10, in_channels=1, depth=10, width=1) is None
    assert robustbench_call("tiny_cnn", 10) is None
    assert robustbench_call("wrn", 10, depth=10, width=1).cls == "WideResNet"


def test_no_zoo_entry_for_a_data_set_robustbench_does_not_have(tmp_path):
    run = tmp_path / "run"
    _make_run(run)                                     # synthetic 8x8 data
    written = export_run(run, tmp_path / "out", name="M")
    assert "zoo_entry" not in written and not (tmp_path / "out" / "model_zoo_entry.py").exists()
    assert json.loads(written["manifest"].read_text())["robustbench_architecture"] is None


def test_curves_are_copied_only_when_they_are_a_png_file_of_the_run(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the export")
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    for i, make in enumerate((lambda c: c.symlink_to(secret), lambda c: c.write_text("not a png"),
                              lambda c: c.write_bytes(png))):
        run = tmp_path / f"run{i}"
        _make_run(run)
        make(run / "curves.png")
        written = export_run(run, tmp_path / f"out{i}", name="M")
        assert ("curves" in written) == (i == 2)
        if i == 2:
            assert written["curves"].read_bytes() == png
            assert "](curves.png)" in written["model_card"].read_text()


# ----------------------------------------------------------------------------- crafted exports

def test_load_exported_validates_an_exports_metadata(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    written = export_run(run, tmp_path / "out", name="M")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(written["safetensors"]), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for field, value, message in (("arch", "mlp'); x('", "metadata arch"),
                                  ("model_kwargs", '{"__class__": 1}', "model_kwargs"),
                                  ("data_info", json.dumps({**SMALL, "name": "../x"}), "data_info.name")):
        save_file(state, str(written["safetensors"]), metadata={**meta, field: value})
        with pytest.raises(ValueError, match=message):
            load_exported(written["safetensors"])
    manifest = json.loads(written["manifest"].read_text())
    manifest["files"]["safetensors"] = "../../run/best.safetensors"
    written["manifest"].write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="files.safetensors"):
        load_exported(tmp_path / "out")
