"""ADR's automatic tau/lambda (method.schedule=auto): temperature fit, determinism, resume, Eq. 4-5."""
import copy

import pytest
import torch
import torch.nn as nn

from rb_labelrefine.rectifiers.adr import rectify
from rb_labelrefine.rectifiers.adr_auto import (FIT_COST_MARGIN, LAMBDA_MAX, TAU_MAX, TAU_MIN, AutoTauLambda,
                                                budget_points, fit_every, fit_temperature)


def _synthetic(tau_true: float, n: int = 20000, c: int = 10, seed: int = 0):
    """Labels drawn from softmax(z / tau_true): temperature scaling's population optimum is tau_true."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.multinomial(torch.softmax(z / tau_true, 1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("tau_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(tau_true):
    z, y = _synthetic(tau_true)
    assert fit_temperature(z, y) == pytest.approx(tau_true, rel=0.05)


def test_fit_temperature_is_the_nll_minimum_and_clamped():
    z, y = _synthetic(1.7, n=3000, seed=1)
    tau = fit_temperature(z, y)
    nll = lambda t: float(nn.functional.cross_entropy(z.double() / t, y))
    assert nll(tau) <= min(nll(tau * 0.97), nll(tau * 1.03))
    # every point correct with a margin: sharper is always better -> the lower bound
    assert fit_temperature(torch.eye(5) * 2, torch.arange(5)) == pytest.approx(TAU_MIN, rel=1e-6)
    # every point wrong: flatter is always better -> the upper bound
    assert fit_temperature(torch.eye(5) * 2, (torch.arange(5) + 1) % 5) == pytest.approx(TAU_MAX, rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def _teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _auto(points=40, every=1):
    return AutoTauLambda(tau_init=2.5, lambda_init=0.7, eps=0.01, alpha=0.004, steps=3, points=points, seed=3,
                         every=every)


def _data(n=60):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_fit_is_deterministic_and_does_not_touch_the_global_rng():
    x, y = _data()
    t = _teacher()
    a, b = _auto(), _auto()
    state = torch.get_rng_state()
    ra = a.fit(t, x, y, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)
    rb = b.fit(copy.deepcopy(t), x, y, epoch=0)
    for k in ("adr_tau", "adr_lambda", "adr_teacher_val_pgd", "adr_auto_points"):
        assert ra[k] == rb[k]
    assert ra["adr_auto_points"] == 40           # capped at `points`
    assert a.lam == ra["adr_lambda"] == pytest.approx(ra["adr_teacher_val_pgd"] / 100)
    assert TAU_MIN <= a.tau <= TAU_MAX


def test_resume_gives_identical_tau_lambda():
    x, y = _data()
    teachers = [_teacher(s) for s in range(3)]   # the teacher changes between epochs
    full = _auto()
    for e, t in enumerate(teachers):
        full.fit(t, x, y, epoch=e)
    first = _auto()
    first.fit(teachers[0], x, y, epoch=0)
    resumed = _auto()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for e, t in enumerate(teachers[1:], start=1):
        resumed.fit(t, x, y, epoch=e)
    assert resumed.state_dict() == full.state_dict()
    assert len(full.fits) == 3 and len({f["adr_tau"] for f in full.fits}) > 1


@pytest.mark.parametrize("tau", [TAU_MIN, 1.0, TAU_MAX, 1e-3, 1e3])
@pytest.mark.parametrize("lam", [0.0, 0.5, LAMBDA_MAX])
def test_true_class_stays_the_most_likely_with_extreme_fitted_values(tau, lam):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 20     # teachers confidently wrong on ~90 %
    y = torch.randint(0, 10, (500,), generator=g)
    p = rectify(logits, y, tau, lam)
    p_true = p.gather(1, y[:, None]).squeeze(1)
    others = p.scatter(1, y[:, None], -1.0).max(1).values
    assert bool((p_true > others).all())                 # strictly (lambda < 1)
    assert torch.allclose(p.sum(1), torch.ones(500, dtype=p.dtype))


def test_fitted_lambda_never_reaches_one():
    x, y = _data(20)
    t = _teacher()
    with torch.no_grad():   # a teacher that is right everywhere, even under attack
        for m in t.modules():
            if isinstance(m, nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        t[-1].bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    a = _auto()
    a.fit(t, x, torch.zeros(20, dtype=torch.long), epoch=0)
    assert a.lam == LAMBDA_MAX


def test_budget_points_is_two_percent_of_an_epoch_within_bounds():
    n = budget_points(45000, 10, 10)                   # CIFAR-10 train split, PGD-10 in training and validation
    assert 0.0195 <= n * (10 + 1 / 3) * FIT_COST_MARGIN / (45000 * (10 + 1 + 1 / 3)) <= 0.02
    assert budget_points(500, 10, 10) == 100           # floor: small data sets pay more than 2 %
    assert budget_points(10 ** 7, 10, 10) == 1000


def _cost(samples, train_steps, val_steps, points, epochs, every, share=0.02):
    """Fit cost / training cost over the first ``epochs`` epochs (the pass counts of budget_points, the
    fit's with the margin)."""
    fits = sum(1 for e in range(epochs) if AutoTauLambda(tau_init=1, lambda_init=0, eps=0, alpha=0, steps=0,
                                                         every=every).due(e))
    return fits * points * (val_steps + 1 / 3) * FIT_COST_MARGIN / (epochs * samples * (train_steps + 1 + 1 / 3))


@pytest.mark.parametrize("samples,train_steps,val_steps,share", [
    (500, 10, 10, 0.02),       # fmnist-adr-auto: 500 images, PGD-10 / PGD-10
    (192, 2, 2, 0.02), (500, 10, 20, 0.02), (500, 10, 10, 0.05), (45000, 10, 10, 0.02), (1000, 5, 10, 0.01)])
def test_fit_interval_keeps_every_prefix_of_the_run_within_the_budget(samples, train_steps, val_steps, share):
    points = budget_points(samples, train_steps, val_steps, share=share)
    every = fit_every(samples, train_steps, val_steps, points, share=share)
    assert points >= 100                                  # never a fit too small to mean anything
    for epochs in range(1, 200):
        assert _cost(samples, train_steps, val_steps, points, epochs, every) <= share + 1e-12, epochs
    if every > 1:   # the fewest epochs between fits: one fewer would break the budget after every-1 epochs
        assert _cost(samples, train_steps, val_steps, points, every - 1, every - 1) > share


def test_fit_interval_on_the_fmnist_protocol_and_large_data():
    assert fit_every(500, 10, 10, budget_points(500, 10, 10)) == 12      # one fit = 18 % (x 1.25) of an epoch
    assert fit_every(45000, 10, 10, budget_points(45000, 10, 10)) == 1   # CIFAR-10: 2 % per epoch already
    assert fit_every(500, 10, 10, 100, share=1.0) == 1
    with pytest.raises(ValueError, match="share"):
        fit_every(500, 10, 10, 100, share=0.0)


def test_held_epochs_log_the_fitted_values_deterministically_and_resume_mid_interval():
    x, y = _data()
    teachers = [_teacher(s) for s in range(7)]   # the teacher changes every epoch
    state = torch.get_rng_state()
    full, again = _auto(every=3), _auto(every=3)
    recs = [full.end_of_epoch(t, x, y, epoch=e) for e, t in enumerate(teachers)]
    recs2 = [again.end_of_epoch(copy.deepcopy(t), x, y, epoch=e) for e, t in enumerate(teachers)]
    assert torch.equal(torch.get_rng_state(), state)            # no global RNG drawn
    strip = lambda rs: [{k: v for k, v in r.items() if k != "adr_auto_s"} for r in rs]
    assert strip(recs) == strip(recs2)                            # two runs, equal
    assert [r["adr_auto_fit"] for r in recs] == [False, False, True, False, False, True, False]
    assert [f["epoch"] for f in full.fits] == [3, 6]
    assert (recs[0]["adr_tau"], recs[0]["adr_lambda"]) == (2.5, 0.7) and "adr_teacher_val_pgd" not in recs[0]
    for e in (3, 4):   # held: the values (and the accuracy they came from) of the fit after epoch 3
        assert {k: recs[e][k] for k in ("adr_tau", "adr_lambda", "adr_teacher_val_pgd")} == \
            {k: recs[2][k] for k in ("adr_tau", "adr_lambda", "adr_teacher_val_pgd")}
        assert recs[e]["adr_auto_s"] == 0.0
    assert recs[5]["adr_tau"] != recs[2]["adr_tau"]
    # stopped after epoch 4 (mid interval), resumed from the state_dict
    part = _auto(every=3)
    for e, t in enumerate(teachers[:4]):
        part.end_of_epoch(t, x, y, epoch=e)
    resumed = _auto(every=3)
    resumed.load_state_dict(copy.deepcopy(part.state_dict()))
    tail = [resumed.end_of_epoch(t, x, y, epoch=e) for e, t in enumerate(teachers[4:], start=4)]
    assert strip(tail) == strip(recs[4:]) and resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="every 3 epoch.*every 2"):
        _auto(every=2).load_state_dict(full.state_dict())
    old = {k: v for k, v in _auto().state_dict().items() if k != "every"}   # a checkpoint from before the interval
    _auto().load_state_dict(old)


def test_auto_config_fields_are_validated_by_name():
    from rb_labelrefine.config import ConfigError, load_config

    for field, bad in (("auto_every", 0), ("auto_share", 0), ("auto_share", 1.5), ("auto_points", 0)):
        with pytest.raises(ConfigError, match=f"method.{field}"):
            load_config("fmnist-adr-auto", [f"method.{field}={bad}"])
    cfg = load_config("fmnist-adr-auto")
    assert (cfg.method.schedule, cfg.method.auto_share, cfg.method.auto_every) == ("auto", 0.02, None)


def test_curves_draw_the_adr_panel(tmp_path):
    from _extras import need

    need("matplotlib")
    Image = need("PIL.Image")

    from rb_labelrefine.plots import plot_curves

    hist = [{"epoch": e, "test_clean": 50.0, "test_pgd": 30.0, "adr_tau": 2.0 - 0.1 * e, "adr_lambda": 0.3 + 0.1 * e}
            for e in (1, 2, 3)]
    wide = Image.open(plot_curves({"auto": hist}, tmp_path / "a.png")).size
    plain = Image.open(plot_curves({"cosine": [{k: v for k, v in r.items() if not k.startswith("adr")}
                                               for r in hist]}, tmp_path / "b.png")).size
    assert wide[0] > plain[0] * 1.3                     # a third panel
    held = [{**r, "adr_auto_fit": r["epoch"] == 2} for r in hist]   # schedule=auto: dots on the fitted epochs
    assert Image.open(plot_curves({"auto": held}, tmp_path / "c.png")).size == wide
