"""The RobustBench import door and the classic AutoAttack adapter over pyautoattack."""
import logging
import sys
import types

import pytest
import torch
from torch import nn

from _extras import need

need("pyautoattack", "robustbench")

from rb_labelrefine.compat import robustbench as compat


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()


def _data(model, n=12):
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)   # labels the model gets right: the attack has work to do
    return x, y


def test_import_robustbench_works_and_uses_the_adapter():
    rb = compat.import_robustbench()
    assert hasattr(rb, "benchmark") and hasattr(rb, "load_model")
    import robustbench.eval

    if compat.autoattack_backend() == "pyautoattack":
        assert robustbench.eval.AutoAttack is compat.ClassicAutoAttack
        import pyautoattack.state

        assert robustbench.eval.EvaluationState is pyautoattack.state.EvaluationState
        cls, backend, version = compat.classic_autoattack()
        assert cls is compat.ClassicAutoAttack and backend == "pyautoattack" and version == "0.2.0"
    assert compat.import_robustbench() is rb   # idempotent


def _swapped(name: str) -> bool:
    # Only the modules that bind the AutoAttack name are re-imported: robustbench's model zoo
    # stays cached, so its timm registrations are not run twice.
    return name in ("autoattack", "robustbench", "robustbench.eval") or name.startswith("autoattack.")


def test_shim_steps_aside_for_a_real_autoattack():
    compat.import_robustbench()
    saved = {k: v for k, v in sys.modules.items() if _swapped(k)}
    fake = types.ModuleType("autoattack")
    fake_state = types.ModuleType("autoattack.state")

    class AutoAttack:  # stands in for the GitHub package's class
        pass

    class EvaluationState:
        pass

    fake.AutoAttack, fake.state, fake.__version__ = AutoAttack, fake_state, "0.1"
    fake_state.EvaluationState = EvaluationState
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules["autoattack"] = fake
        sys.modules["autoattack.state"] = fake_state
        assert compat.autoattack_backend() == "autoattack"
        assert compat.classic_autoattack() == (AutoAttack, "autoattack", "0.1")
        compat.import_robustbench()
        import robustbench.eval

        assert robustbench.eval.AutoAttack is AutoAttack        # the real package, untouched
        assert sys.modules["autoattack"] is fake                 # no shim installed over it
    finally:
        for k in [k for k in sys.modules if _swapped(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert compat.autoattack_backend() in ("pyautoattack", "autoattack")


def test_classic_run_standard_evaluation_returns_x_adv(tmp_path):
    model = _linear_model()
    x, y = _data(model)
    eps = 8 / 255
    logger = logging.getLogger("auto-attack")
    handlers_before = list(logger.handlers)
    log = tmp_path / "aa.log"
    adversary = compat.ClassicAutoAttack(model, norm="Linf", eps=eps, seed=0, verbose=True, version="custom",
                                         attacks_to_run=["apgd-ce"], device="cpu", log_path=str(log))
    adversary.apgd.n_iter = 10              # attribute access falls through to pyautoattack
    adversary.apgd.n_restarts = 1
    x_adv = adversary.run_standard_evaluation(x, y, bs=5)
    assert torch.is_tensor(x_adv) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 1.0   # a linear model is not robust
    x_adv2, y_adv = adversary.run_standard_evaluation(x, y, bs=5, return_labels=True)
    assert y_adv.shape == y.shape
    # the classic log file gets AutoAttack's lines, and no handler outlives the call
    assert "robust accuracy after APGD-CE" in log.read_text()
    assert logger.handlers == handlers_before


def test_classic_contract_refuses_an_attack_list_outside_custom():
    with pytest.raises(ValueError, match="version='custom'"):
        compat.ClassicAutoAttack(_linear_model(), norm="Linf", eps=0.03, version="standard",
                                 attacks_to_run=["apgd-ce"], device="cpu")
