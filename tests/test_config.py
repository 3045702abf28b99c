"""Presets load and validate; bad values are rejected with the offending field named."""
import pytest

from rb_labelrefine.cli import main
from rb_labelrefine.config import ConfigError, apply_overrides, config_from_dict, list_presets, load_config, load_raw

PRESETS = list_presets()


def test_there_are_presets_for_every_paper_setting():
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        for arch in ("resnet18", "preactresnet18", "wrn34-10"):
            for suffix in ("pgdat", "trades", "pgdat-adr", "trades-adr", "pgdat-adr-wa-awp", "trades-adr-wa-awp",
                           "pgdat-kd-swa", "trades-ltd", "trades-ltd-awp", "pgdat-sglr", "trades-sglr", "natural"):
                assert f"{ds}-{arch}-{suffix}" in PRESETS
    for m in ("pgdat", "trades", "adr", "adr-wa", "sglr", "kd-swa", "ltd", "ls", "awp", "wa", "natural"):
        assert f"digits-{m}" in PRESETS and f"fmnist-{m}" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.name == name


def test_paper_hyperparameters_in_presets():
    c = load_config("cifar10-resnet18-pgdat-adr")
    assert (c.method.tau_high, c.method.tau_low, c.method.lambda_low, c.method.lambda_high) == (2.5, 2.0, 0.7, 0.95)
    assert c.attack.eps == pytest.approx(8 / 255) and c.attack.alpha == pytest.approx(2 / 255) and c.attack.steps == 10
    assert c.train.epochs == 200 and c.optim.lr == 0.1 and c.optim.weight_decay == 5e-4 and c.data.batch_size == 128
    c = load_config("cifar100-wrn34-10-pgdat-adr-wa-awp")
    assert (c.method.tau_high, c.method.tau_low) == (1.5, 1.0) and c.wa.enabled and c.awp.gamma == 0.005
    c = load_config("tinyimagenet-resnet18-pgdat-adr")
    assert (c.method.lambda_low, c.method.lambda_high, c.train.epochs) == (0.5, 0.9, 80)
    c = load_config("cifar10-preactresnet18-pgdat-kd-swa")
    assert c.method.kd_weights == "paper" and c.method.temperature == 2.0 and c.swa.enabled
    assert c.optim.milestones == [50, 150] and c.data.val_fraction == 0.1
    c = load_config("cifar10-wrn34-10-trades-ltd")
    assert c.objective.name == "trades" and c.objective.beta == 6.0 and c.method.temperature == 5.0
    assert c.train.epochs == 120 and c.optim.milestones == [80, 100]
    c = load_config("cifar10-resnet18-pgdat-sglr")
    assert (c.method.alpha, c.method.temperature, c.method.momentum, c.method.variant) == (0.2, 1.5, 0.9, "paper")


def test_overrides_and_fraction_syntax():
    c = load_config("digits-adr", ["train.epochs=2", "attack.eps=8/255", "wa.enabled=true"])
    assert c.train.epochs == 2 and c.attack.eps == pytest.approx(8 / 255) and c.wa.enabled


@pytest.mark.parametrize("override,field", [
    ("attack.eps=-0.1", "attack.eps"),
    ("method.lambda_high=1.5", "method.lambda_high"),
    ("method.lambda_low=-0.2", "method.lambda_low"),
    ("method.name=mixup", "method.name"),
    ("objective.name=fast", "objective.name"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=two", "train.epochs"),
    ("data.name=imagenet22k", "data.name"),
    ("attack.bn_mode=sometimes", "attack.bn_mode"),
    ("method.teacher=/no/such/file.pt", "method.teacher"),
    ("train.nonsense=1", "train.nonsense"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        cfg = "digits-ltd" if "teacher" in override else "digits-adr"
        load_config(cfg, [override])
    assert exc.value.field == field
    assert field in str(exc.value)


def test_ltd_requires_trades_form():
    with pytest.raises(ConfigError, match="objective.name"):
        load_config("digits-ltd", ["objective.name=pgd_at"])


@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", "digits-adr", "--out", "{tmp}/r", "--set", "attack.eps=-1"], "attack.eps"),
    (["train", "--config", "digits-adr", "--out", "{tmp}/r", "--set", "method.lambda_low=2"], "method.lambda_low"),
    (["train", "--config", "digits-adr", "--out", "{tmp}/r", "--set", "method.name=nope"], "method.name"),
    (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "file not found"),
    (["train", "--config", "no-such-preset", "--out", "{tmp}/r"], "unknown preset"),
    (["train", "--config", "digits-adr", "--out", "{tmp}/r", "--set", "epochs"], "section.key=value"),
    (["train", "--config", "digits-ltd", "--out", "{tmp}/r"], "method.teacher"),
])
def test_cli_exit_code_2_names_the_field(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "r").exists()   # nothing written for a rejected config


def test_cli_configs_lists_and_shows(capsys):
    assert main(["configs", "--filter", "digits"]) == 0
    out = capsys.readouterr().out
    assert "digits-adr" in out and "cifar10" not in out
    assert main(["configs", "--show", "digits-adr"]) == 0
    assert "tau_high: 2.5" in capsys.readouterr().out


def test_yaml_file_config_with_base(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: digits-adr\ntrain: {epochs: 3}\n")
    c = load_config(str(f))
    assert c.method.name == "adr" and c.train.epochs == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("attack: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
