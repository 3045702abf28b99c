"""Presets load and validate; bad values are rejected with the offending field named."""
import pytest
import yaml

from rb_labelrefine.cli import main
from rb_labelrefine.config import (ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config,
                                   list_presets, load_config, load_raw, make_method)
from rb_labelrefine.rectifiers import get_method

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
    # config/cifar100/wrn_pgd_awp_adr.gin of the ADR code: with AWP tau 2.0 -> 1.0, lambda 0.7 -> 0.85
    assert (c.method.tau_high, c.method.tau_low, c.method.lambda_high) == (2.0, 1.0, 0.85)
    assert c.wa.enabled and c.awp.gamma == 0.005
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


# ----------------------------------------------------------------------------- method sections

def _cfg(method: dict, **sections):
    return config_from_dict({"method": method, "objective": {"name": "trades"}, **sections})


def test_omitted_method_fields_take_that_methods_paper_defaults():
    assert _cfg({"name": "ltd"}).method.temperature == 5.0           # LTD's best teacher temperature
    assert _cfg({"name": "kd"}).method.temperature == 2.0            # KD+SWA's T
    assert _cfg({"name": "sglr"}).method.temperature == 1.5          # SGLR Table 4
    assert _cfg({"name": "sglr"}).method.start_epoch == 0
    assert _cfg({"name": "sglr", "variant": "code"}).method.start_epoch == 90   # the public scripts' ES
    assert _cfg({"name": "sglr", "variant": "code", "start_epoch": 0}).method.start_epoch == 0
    adr = _cfg({"name": "adr"}).method
    assert (adr.ema_decay, adr.tau_high, adr.tau_low, adr.lambda_low, adr.lambda_high) == (0.995, 2.5, 2.0, 0.7, 0.95)
    assert _cfg({"name": "label_smoothing"}).method.smoothing == 0.1
    assert config_from_dict({}).method.name == "onehot"


@pytest.mark.parametrize("method,stray,owner", [
    ({"name": "ltd"}, "lambda_low", "adr"),
    ({"name": "adr"}, "temperature", "sglr / ltd / kd"),
    ({"name": "onehot"}, "smoothing", "label_smoothing"),
    ({"name": "kd"}, "teacher", "ltd"),
    ({"name": "sglr"}, "robust_teacher", "kd"),
])
def test_a_field_of_another_method_is_an_error_naming_it(method, stray, owner):
    with pytest.raises(ConfigError) as exc:
        _cfg({**method, stray: 0.5})
    assert exc.value.field == f"method.{stray}"
    assert f"a setting of {owner}, not of {method['name']}" in str(exc.value)
    assert f"{method['name']}'s settings:" in str(exc.value)


def test_an_unknown_method_field_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        _cfg({"name": "ltd", "tempreature": 4})
    assert exc.value.field == "method.tempreature" and "ltd's settings: teacher, temperature" in str(exc.value)


def test_switching_a_presets_method_with_set_names_the_stray_field():
    with pytest.raises(ConfigError) as exc:
        load_config("digits-ltd", ["method.name=adr", "objective.name=pgd_at"])
    assert exc.value.field == "method.temperature" and "--set 'method={name: adr}'" in str(exc.value)
    c = load_config("digits-ltd", ["method={name: adr}", "objective.name=pgd_at", "method.tau_low=1.5"])
    assert c.method.name == "adr" and c.method.tau_low == 1.5 and c.method.tau_high == 2.5


@pytest.mark.parametrize("method,field,value", [
    ("label_smoothing", "smoothing", 1.5),
    ("adr", "ema_decay", 1.0), ("adr", "tau_high", 0.0), ("adr", "tau_low", -1.0),
    ("adr", "lambda_low", -0.1), ("adr", "lambda_high", 1.1),
    ("sglr", "variant", "both"), ("sglr", "alpha", 2.0), ("sglr", "temperature", 0.0),
    ("sglr", "momentum", -0.5), ("sglr", "clean_weight", 1.5), ("sglr", "start_epoch", -1),
    ("ltd", "temperature", 0.0), ("ltd", "teacher", "/no/such/teacher.pt"),
    ("kd", "kd_weights", "half"), ("kd", "robust_weight", 0.9), ("kd", "standard_weight", -0.1),
    ("kd", "temperature", -2.0), ("kd", "robust_teacher", "/no/such/run"), ("kd", "standard_teacher", "/no/such/run"),
    ("sglr", "start_epoch", "soon"), ("adr", "tau_high", "hot"),
])
def test_each_methods_validation_names_its_field(method, field, value):
    with pytest.raises(ConfigError) as exc:
        _cfg({"name": method, field: value})
    assert exc.value.field == f"method.{field}", exc.value
    with pytest.raises(ConfigError) as exc:
        make_method(method, **{field: value})
    assert exc.value.field == f"method.{field}"


def test_kd_weights_sum_is_checked():
    with pytest.raises(ConfigError, match="robust_weight \\+ standard_weight must be <= 1") as exc:
        _cfg({"name": "kd", "kd_weights": "custom", "robust_weight": 0.7, "standard_weight": 0.5})
    assert exc.value.field == "method.robust_weight"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_exactly_with_only_its_methods_fields(name):
    cfg = load_config(name)
    d = config_to_dict(cfg)
    assert set(d["method"]) == {"name", *get_method(cfg.method.name).field_names()}
    assert config_from_dict(d) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg   # what resume compares


def test_method_settings_are_their_own_dataclass_with_a_read_only_name():
    cfg = load_config("digits-sglr")
    assert type(cfg.method).__name__ == "SGLRSettings" and cfg.method.name == "sglr"
    with pytest.raises(AttributeError):
        cfg.method.name = "adr"


def test_the_registry_refuses_a_second_method_of_the_same_name():
    from dataclasses import dataclass

    from rb_labelrefine.rectifiers.registry import METHODS, MethodSettings, register_method

    @dataclass
    class Dummy(MethodSettings):
        pass

    with pytest.raises(ValueError, match="'adr' is already registered by rb_labelrefine.rectifiers.adr"):
        register_method("adr", settings=Dummy, label="X", summary="x")(lambda s, ctx: None)
    assert METHODS["adr"].settings.__name__ == "ADRSettings"
    with pytest.raises(TypeError, match="must not have a field 'name'"):
        @dataclass
        class Named(MethodSettings):
            name: str = "x"
        register_method("named", settings=Named, label="X", summary="x")


def test_a_new_method_is_one_registration_away(tmp_path):
    """A method defined outside the package (settings + factory + registration) is usable from
    YAML with its own defaults and validation, and dumps its own fields."""
    from dataclasses import dataclass

    from rb_labelrefine.rectifiers import OneHot
    from rb_labelrefine.rectifiers.registry import METHODS, MethodSettings, register_method

    @dataclass
    class ToySettings(MethodSettings):
        strength: float = 0.3

        def validate(self):
            self._unit("strength")

    register_method("toy", settings=ToySettings, label="TOY", summary="a test method")(
        lambda s, ctx: OneHot(ctx.num_classes))
    try:
        c = config_from_dict({"method": {"name": "toy"}})
        assert c.method.strength == 0.3 and config_to_dict(c)["method"] == {"name": "toy", "strength": 0.3}
        with pytest.raises(ConfigError) as exc:
            config_from_dict({"method": {"name": "toy", "strength": 3}})
        assert exc.value.field == "method.strength"
    finally:
        del METHODS["toy"]


def test_model_card_parameters_come_from_the_methods_settings():
    from rb_labelrefine.export.model_card import _method_params

    # KD shows the weights it trains with, not the unused custom pair
    assert _method_params("kd", {"name": "kd", "kd_weights": "code"}).startswith(
        "kd (kd_weights=code, robust_weight=0.6, standard_weight=0.1, temperature=2.0")
    assert _method_params("ltd", {"name": "ltd"}) == "ltd (teacher=None, temperature=5.0)"
    assert _method_params("onehot", {"name": "onehot"}) == "onehot"
    assert _method_params("mystery", {"name": "mystery", "a": 1}) == "mystery (a=1)"  # unknown: shown as written
