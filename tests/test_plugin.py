"""The package as a plugin: the core without extras, lazy imports, and the small fixes of issue 11."""
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _extras import need

OPTIONAL = ("torchvision", "timm", "robustbench", "pyautoattack", "autoattack", "sklearn", "matplotlib",
            "torchattacks", "PIL", "scipy")
# Makes every optional dependency not found in a subprocess, as in a core-only install: each
# finder answers None for them (torch itself probes optional modules with find_spec).
_BLOCK = textwrap.dedent(f"""
    import sys
    class _Hide:
        def __init__(self, finder):
            self._finder = finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL!r}:
                return None
            return self._finder.find_spec(name, path, target)
        def __getattr__(self, attr):
            return getattr(self._finder, attr)
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


def _run(code, *, block=True, timeout=600):
    src = (_BLOCK if block else "") + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------ the core, no extras
def test_core_trains_on_synthetic_data_without_any_extra(tmp_path):
    proc = _run(f"""
        import torch, rb_labelrefine as rl
        from rb_labelrefine.config import load_config
        from rb_labelrefine.training.trainer import Trainer
        cfg = load_config("digits-adr", ["data.name=synthetic", "model.arch=tiny_cnn", "train.epochs=2",
                                         "attack.steps=2", "train.threads=1", "data.batch_size=64"])
        s = Trainer(cfg, {str(tmp_path / 'run')!r}, progress=False).fit()
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        ema, rect = rl.EMA(model, decay=0.9), rl.ADR(model, num_classes=3, total_steps=4)
        from rb_labelrefine.attacks import build_attack
        x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        t = rect.targets(x, y)
        x_adv = build_attack("pgd", model, eps=0.1, alpha=0.05, steps=2)(x, t.for_attack)
        print("OK", s["epochs"], sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "OK 2 []"
    assert "no curves.png" in proc.stderr and "extra [plot]" in proc.stderr and '"matplotlib>=3.7"' in proc.stderr
    assert (tmp_path / "run" / "final.safetensors").is_file() and not (tmp_path / "run" / "curves.png").exists()


MISSING = [
    ("from rb_labelrefine.data import load_digits_data; load_digits_data()", "data"),
    ("from rb_labelrefine.models import create_model; create_model('timm:resnet10t', 10)", "timm"),
    ("from rb_labelrefine.models import create_model; create_model('wrn_34_10', 10)", "robustbench"),
    ("from rb_labelrefine.compat.robustbench import import_robustbench; import_robustbench()", "robustbench"),
    ("from rb_labelrefine.evaluation.autoattack import run_autoattack; import torch;"
     "run_autoattack(torch.nn.Flatten(), torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))", "robustbench"),
    ("from rb_labelrefine.plots import plot_curves; plot_curves({}, 'x.png')", "plot"),
    ("from rb_labelrefine.attacks import build_attack; import torch;"
     "build_attack('apgd', torch.nn.Flatten(), eps=0.1, alpha=0.1, steps=1)", "attacks"),
]


def test_a_missing_extra_is_named():
    proc = _run(f"""
        import json
        out = []
        for code in {[c for c, _ in MISSING]!r}:
            try:
                exec(code)
                out.append("no error")
            except ImportError as exc:
                out.append(type(exc).__name__ + ": " + str(exc))
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (code, extra), msg in zip(MISSING, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert msg.startswith("MissingExtraError") and f"extra [{extra}]" in msg, (code, msg)
        assert "rb-labelrefine[" not in msg and "pip install" in msg, (code, msg)  # not on an index


@pytest.mark.parametrize("argv", [["--help"], ["configs"], ["configs", "--filter", "cifar10,adr", "-v"],
                                  ["train", "--help"], ["leaderboard", "--autoattack", "50", "--n", "10000"]])
def test_help_configs_and_leaderboard_answer_without_torch(argv):
    proc = _run(f"""
        import sys
        from rb_labelrefine.cli import main
        try:
            code = main({argv!r})
        except SystemExit as e:
            code = e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors"))
        print("RESULT", code, heavy, file=sys.stderr)
    """, block=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "RESULT 0 []"


def test_configs_filter_matches_whole_words(capsys):
    from rb_labelrefine.cli import main

    assert main(["configs", "--filter", "cifar10"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all(n.startswith("cifar10-") for n in names)
    assert main(["configs", "--filter", "cifar100,adr"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all(n.startswith("cifar100-") and "-adr" in n for n in names)


# ------------------------------------------------------------------ small fixes
def _cifar_like(n=3):
    rng = np.random.default_rng(0)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def test_protocol_2_cifar_pickles_load(tmp_path):
    from rb_labelrefine.data import load_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_like()
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)     # Python 3 writes bytes via _codecs.encode here
    assert b"_codecs" in (folder / "test_batch").read_bytes()
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    _, test, _ = load_cifar(folder)
    x, y = test.tensors()
    assert y.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal((x * 255).round().to(torch.uint8).reshape(3, 3072), torch.from_numpy(batches["test_batch"][b"data"]))


class _Codecs:
    """A pickle calling _codecs.encode other than as protocol 2 does (text -> latin-1 bytes)."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        import _codecs

        return _codecs.encode, self.args


@pytest.mark.parametrize("args", [("x", "rot13"), (b"x", "latin1"), ("x", "latin1", "ignore")])
def test_codecs_encode_is_allowed_only_as_protocol_2_uses_it(tmp_path, args):
    from rb_labelrefine.data import UnsafePickleError
    from rb_labelrefine.data.safe_pickle import safe_load_pickle

    p = tmp_path / "batch"
    p.write_bytes(pickle.dumps({b"data": _Codecs(*args)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        safe_load_pickle(p)
    p.write_bytes(pickle.dumps({b"data": _Codecs("\xff", "latin1")}, protocol=2))
    assert safe_load_pickle(p) == {b"data": b"\xff"}


def test_sanity_wording_says_the_tolerance_when_accuracy_rises_a_little(monkeypatch):
    from rb_labelrefine.evaluation import sanity

    accs = iter([60.0, 60.5, 61.0, 61.0])
    monkeypatch.setattr(sanity, "_robust_mask", lambda *a, **k: None)
    monkeypatch.setattr(sanity, "_pct", lambda mask: next(accs))
    r = sanity._steps_sweep(None, None, None, 8 / 255, 2 / 255, [10, 20, 50, 100], "Linf", 2.0, 8, "cpu", 0)
    assert r["passed"] and r["acc"] == [60.0, 60.5, 61.0, 61.0]
    assert "does not rise" not in r["reason"]
    assert r["reason"] == ("accuracy rises by no more than the 2-point noise tolerance with more steps "
                           "(60.0% at 10 -> 61.0% at 100)")
    accs = iter([60.0, 59.0, 58.0, 58.0])
    r = sanity._steps_sweep(None, None, None, 8 / 255, 2 / 255, [10, 20, 50, 100], "Linf", 2.0, 8, "cpu", 0)
    assert r["reason"].startswith("accuracy does not rise with more steps (60.0% at 10 -> 58.0% at 100)")
    accs = iter([60.0, 63.0])
    r = sanity._steps_sweep(None, None, None, 8 / 255, 2 / 255, [10, 20], "Linf", 2.0, 8, "cpu", 0)
    assert not r["passed"]


def test_machine_lines_never_print_placeholders():
    from rb_labelrefine.export.model_card import _machine_lines

    lines = _machine_lines({"best": {"robust_acc": 50.0}, "final": {"machine": {"device": "cpu", "torch": "2.15.0",
                                                                               "threads": 2}, "elapsed_s": 12.4}},
                           {"train_seconds": 30.0})
    assert lines == ["best evaluation: machine not recorded", "final evaluation: cpu, torch 2.15.0, 2 CPU threads, 12 s",
                     "training: 30 s"]
    assert not any("?" in ln or "unknown" in ln for ln in lines)


def test_card_front_matter_follows_the_hub_format():
    import yaml

    from rb_labelrefine.export.model_card import _front_matter

    def fm(dataset, result):
        return yaml.safe_load(_front_matter(name="M", dataset=dataset, threat_model="Linf", eps=8 / 255,
                                            method_tag="adr", objective="pgd_at", result=result, license="mit"))

    none = fm("digits", None)
    assert "model-index" not in none and "datasets" not in none       # nothing measured; no Hub id for digits
    full = fm("cifar100", {"clean_acc": 60.0, "robust_acc": 30.0, "n": 10000, "standard": True})
    names = [m["name"] for m in full["model-index"][0]["results"][0]["metrics"]]
    assert names == ["Clean accuracy (CIFAR-100 test, full test set)",
                     "AutoAttack standard robust accuracy (Linf, eps=8/255, full test set)"]
    assert full["datasets"] == ["uoft-cs/cifar100"]
    assert fm("fashion_mnist", {"robust_acc": 50.0, "n": 300})["datasets"] == ["zalando-datasets/fashion_mnist"]


def test_timm_vit_without_img_size_is_a_clear_usage_error(tmp_path, capsys):
    need("timm")
    from rb_labelrefine.cli import main

    argv = ["train", "--config", "digits-pgdat", "--out", str(tmp_path / "run"), "--quiet",
            "--set", "data.name=synthetic", "--set", "model.arch=timm:vit_tiny_patch16_224", "--set", "train.epochs=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "timm:vit_tiny_patch16_224 is built for 224x224 inputs, the data are 32x32" in err
    assert "model.kwargs.img_size=32" in err and "Traceback" not in err


def test_safetensors_files_get_the_usual_mode(tmp_path):
    from rb_labelrefine.export.robustbench_export import _write_safetensors
    from rb_labelrefine.runs import write_weights

    probe = tmp_path / "probe.txt"
    probe.write_text("x")
    usual = stat.S_IMODE(probe.stat().st_mode)
    model = torch.nn.Linear(2, 2)
    write_weights(model, tmp_path / "a.safetensors", {"k": "v"})
    _write_safetensors(model.state_dict(), tmp_path / "b.safetensors", {"k": "v"})
    for p in ("a.safetensors", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / p).stat().st_mode) == usual, p
