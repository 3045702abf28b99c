"""Issue 23: the package fits a researcher's own pipeline -- `--set` with several pairs, subpackages
after `import rb_labelrefine as rl`, the objectives' call and attack model, missing-extra hints
that work from where the user is, IndexedDataset's attributes, the rectifier on normalised inputs."""
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rb_labelrefine as rl
from rb_labelrefine import cli
from rb_labelrefine.attacks import build_attack
from rb_labelrefine.objectives import PGDAT, TRADES
from rb_labelrefine.rectifiers.base import Target

REPO = Path(__file__).resolve().parents[1]


def _run(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


# ----------------------------------------------------------------------------- --set

def test_set_takes_several_pairs_after_one_flag_and_stays_repeatable():
    args = cli.build_parser().parse_args(["train", "--config", "digits-adr", "--out", "x", "--set", "train.epochs=2",
                                          "data.batch_size=64", "--resume", "--set", "train.seed=3"])
    assert args.resume and cli._flat(args.set) == ["train.epochs=2", "data.batch_size=64", "train.seed=3"]
    from rb_labelrefine.config import load_config

    cfg = load_config("digits-adr", cli._flat(args.set))
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.train.seed) == (2, 64, 3)
    with pytest.raises(SystemExit):            # a flag without a pair is still an argparse error
        cli.build_parser().parse_args(["train", "--config", "c", "--out", "x", "--set"])


# ----------------------------------------------------------------------------- subpackages

def test_subpackages_resolve_after_import_without_importing_extras():
    proc = _run("""
        import sys
        import rb_labelrefine as rl
        net = rl.models.wrap_module(__import__("torch").nn.Linear(3, 2), [0.5], [0.25])
        assert type(net).__name__ == "NormalizedModel"
        for name in ("data", "evaluation", "export", "training", "doctor", "config", "attacks", "averaging"):
            getattr(rl, name)
        assert "models" in dir(rl)
        try:
            rl.no_such_thing
        except AttributeError as exc:
            assert "no_such_thing" in str(exc)
        extras = sorted(m for m in ("timm", "robustbench", "matplotlib", "sklearn", "torchattacks", "huggingface_hub")
                        if m in sys.modules)
        print("EXTRAS", extras)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "EXTRAS []"


# ----------------------------------------------------------------------------- objectives

def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("objective", ["pgd_at", "trades"])
def test_adversarial_attacks_the_model_passed_in(objective):
    """Issue 22: `Objective.adversarial(model, ...)` ignored `model` (the attack kept the model it was
    built with). Now it acts on the model passed in, and the attack object is left as it was."""
    built_on, passed = _net(0), _net(1)
    x, y = torch.rand(6, 3, 2, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
    name = "tpgd" if objective == "trades" else "pgd"
    atk = build_attack(name, built_on, eps=0.1, alpha=0.03, steps=3, bn_mode="eval")
    obj = TRADES(atk) if objective == "trades" else PGDAT(atk)
    torch.manual_seed(5)
    got = obj.adversarial(passed, x, Target(y))
    torch.manual_seed(5)
    want = build_attack(name, passed, eps=0.1, alpha=0.03, steps=3, bn_mode="eval")(x, y)
    torch.manual_seed(5)
    other = build_attack(name, built_on, eps=0.1, alpha=0.03, steps=3, bn_mode="eval")(x, y)
    assert torch.equal(got, want) and not torch.equal(got, other)
    assert atk.model is built_on                  # restored: no side effect on the attack


def test_adversarial_with_a_plain_callable_attack():
    calls = []
    obj = PGDAT(lambda x, labels: calls.append(labels) or x + 0)
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    assert torch.equal(obj.adversarial(_net(0), x, Target(y)), x) and len(calls) == 1


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 3), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("forward, passes", [("separate", 2), ("three_pass", 3), ("three_pass_adv_first", 3),
                                             ("concat", 1)])
def test_trades_forward_passes_and_return_value(forward, passes):
    """The README's call: `loss, logits = obj.loss(...)`; the default makes two passes, the TRADES code three."""
    assert TRADES(None).forward == "separate"
    m = _Counting()
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, logits = TRADES(None, forward=forward).loss(m, x, (x + 0.01).clamp(0, 1), Target(y))
    assert m.calls == passes and loss.dim() == 0 and logits.shape == (5, 3)
    loss.backward()


# ----------------------------------------------------------------------------- missing extras

def test_extra_requirements_are_pyprojects():
    import tomllib

    from rb_labelrefine._optional import EXTRA_REQUIREMENTS, EXTRAS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, reqs in EXTRA_REQUIREMENTS.items():
        assert tuple(extras[extra]) == reqs, extra
    assert set(EXTRAS.values()) <= set(EXTRA_REQUIREMENTS)


@pytest.mark.parametrize("extra", ["robustbench", "timm", "vision", "plot", "data", "attacks", "hub"])
def test_install_hints_work_from_where_the_user_is(extra):
    from rb_labelrefine._optional import EXTRA_REQUIREMENTS, install_hint

    hint = install_hint(extra)
    assert "rb-labelrefine[" not in hint           # not on any index
    if extra == "attacks":
        # never the extra or torchattacks with its dependencies (requests~=2.25.1, its robustbench/ copy)
        assert hint.startswith('pip install --no-deps "torchattacks>=3.5" scipy') and ".[attacks]" not in hint
        assert "pip install --force-reinstall --no-deps robustbench==" in hint
    else:
        assert all(f'"{r}"' in hint for r in EXTRA_REQUIREMENTS[extra]) and f'pip install -e ".[{extra}]"' in hint


def test_missing_extra_error_names_the_extra_and_its_requirements(monkeypatch):
    from rb_labelrefine._optional import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "timm", None)         # import timm -> ImportError
    with pytest.raises(MissingExtraError) as e:
        require("timm", "timm", "the model 'timm:resnet18'")
    msg = str(e.value)
    assert "extra [timm]" in msg and 'pip install "timm>=1.0.9"' in msg and "rb-labelrefine[" not in msg


# ----------------------------------------------------------------------------- IndexedDataset

class _LocuslabLike(torch.utils.data.Dataset):
    """A data set with its own state and methods, like locuslab's `Batches` expects."""

    def __init__(self):
        self.x, self.y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        self.classes, self.transform, self.choices = ["a", "b", "c"], None, 0

    def set_random_choices(self):
        self.choices += 1

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = self.x[i] if self.transform is None else self.transform(self.x[i])
        return x, self.y[i]


def test_indexed_dataset_forwards_attributes_to_the_wrapped_dataset():
    from rb_labelrefine.data import IndexedDataset

    inner = _LocuslabLike()
    ds = IndexedDataset(inner)
    ds.set_random_choices()
    assert inner.choices == 1 and ds.choices == 1 and ds.classes == ["a", "b", "c"]
    ds.transform = lambda t: t * 0                     # set on the wrapped data set: what the loader yields
    assert inner.transform is not None and torch.equal(ds[1][0], torch.zeros(3, 2, 2)) and ds[1][2] == 1
    ds.note = "mine"                                   # the wrapped set has no such attribute: the wrapper's
    assert "note" in ds.__dict__ and not hasattr(inner, "note")
    with pytest.raises(AttributeError, match="nope"):
        ds.nope
    inner.transform = None
    back = pickle.loads(pickle.dumps(ds))              # DataLoader workers under spawn pickle it
    assert back.choices == 1 and len(back) == 4 and back.note == "mine"
    assert torch.equal(ds.targets, inner.y)


# ----------------------------------------------------------------------------- normalised inputs

def test_rectifier_on_a_locuslab_model_equals_the_wrapped_model_in_pixel_space():
    """The README's choice: no guessing from tensors -- a rectifier given normalize(X) for a network
    that expects normalised inputs gives the same targets as one built on the wrapped network given X;
    given raw pixels instead, its teacher sees another input (different targets)."""
    mu, std = torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x, y = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
    normalised = rl.ADR.cifar10(net, total_steps=10).targets((x - mu) / std, y).distribution()
    pixels = rl.ADR.cifar10(rl.models.wrap_module(net, mu.flatten(), std.flatten()), total_steps=10).targets(x, y)
    assert torch.allclose(pixels.distribution(), normalised, atol=1e-6)
    wrong = rl.ADR.cifar10(net, total_steps=10).targets(x, y).distribution()
    assert not torch.allclose(wrong, normalised, atol=1e-3)
