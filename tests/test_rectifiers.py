"""Each rectifier against its paper's equations, on hand-made tensors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rb_labelrefine import ADR, LTD, SGLR, KDSelfTeachers, LabelSmoothing, OneHot, kd_loss, rectify
from rb_labelrefine.losses import soft_cross_entropy
from rb_labelrefine.rectifiers.adr import cosine_schedule


# ------------------------------------------------------------------ ADR (Eq. 3-5)
def test_rectify_matches_equations_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])  # sample 1: the teacher is wrong (predicts class 1)
    tau, lam = 2.0, 0.8
    out = rectify(logits, y, tau, lam)
    pt = torch.softmax(logits / tau, 1)                                   # Eq. 3
    # sample 0: teacher right -> lambda_0 = lambda
    exp0 = lam * pt[0] + (1 - lam) * torch.tensor([1.0, 0, 0])
    # sample 1: lambda_1 = clip(lambda - (P[psi] - P[y]))                  # Eq. 4
    lam1 = min(max(lam - (pt[1, 1] - pt[1, 2]).item(), 0.0), 1.0)
    exp1 = lam1 * pt[1] + (1 - lam1) * torch.tensor([0, 0, 1.0])          # Eq. 5
    assert torch.allclose(out[0], exp0, atol=1e-6)
    assert torch.allclose(out[1], exp1, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2), atol=1e-6)


def test_rectify_keeps_true_class_most_likely():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 10, generator=g) * 5
    y = torch.randint(0, 10, (512,), generator=g)
    for tau in (0.5, 1.0, 2.5):
        for lam in (0.0, 0.5, 0.7, 0.95, 1.0):
            p = rectify(logits, y, tau, lam)
            true = p.gather(1, y[:, None]).squeeze(1)
            assert (true[:, None] >= p - 1e-6).all(), (tau, lam)


def test_rectify_lambda_clipping():
    logits = torch.tensor([[10.0, 0.0, 0.0]])       # confident and wrong for y = 1
    y = torch.tensor([1])
    p = rectify(logits, y, 1.0, 0.5)                 # 0.5 - (~1 - ~0) < 0 -> lambda_i = 0
    assert torch.allclose(p, F.one_hot(y, 3).float(), atol=1e-4)
    p = rectify(torch.tensor([[0.0, 0.0, 0.0]]), y, 1.0, 1.7)  # lambda > 1 clipped to 1 -> uniform
    assert torch.allclose(p, torch.full((1, 3), 1 / 3), atol=1e-6)


def test_rectify_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        rectify(torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        rectify(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 1.0, 0.5)


def test_cosine_schedules_endpoints_and_monotone():
    assert cosine_schedule(0, 100, 2.5, 2.0) == pytest.approx(2.5)
    assert cosine_schedule(100, 100, 2.5, 2.0) == pytest.approx(2.0)
    assert cosine_schedule(50, 100, 2.5, 2.0) == pytest.approx(2.25)
    vals = [cosine_schedule(s, 100, 0.7, 0.95) for s in range(101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def _lin(seed=0, c=4, d=6):
    torch.manual_seed(seed)
    return nn.Linear(d, c)


def test_adr_teacher_is_ema_and_schedules_follow_steps():
    model = _lin()
    rect = ADR(model, num_classes=4, total_steps=10, ema_decay=0.9, tau_high=2.5, tau_low=2.0,
               lambda_low=0.7, lambda_high=0.95)
    assert rect.temperature == pytest.approx(2.5) and rect.interpolation == pytest.approx(0.7)
    before = rect.teacher.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    rect.after_step(model)
    expect = 0.9 * before + 0.1 * model.weight                  # theta_t <- g theta_t + (1-g) theta_s
    assert torch.allclose(rect.teacher.module.weight, expect, atol=1e-6)
    for _ in range(9):
        rect.after_step(model)
    assert rect.step == 10
    assert rect.temperature == pytest.approx(2.0) and rect.interpolation == pytest.approx(0.95)


def test_adr_targets_use_teacher_on_clean_batch_and_attack_with_soft_label():
    model = _lin()
    rect = ADR(model, 4, total_steps=5)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    t = rect.targets(x, y)
    expect = rectify(rect.teacher(x), y, rect.temperature, rect.interpolation)
    assert torch.allclose(t.distribution(), expect)
    assert t.for_attack is t.distribution()     # P drives the attack too (Eq. 2)
    assert not t.distribution().requires_grad


def test_adr_state_roundtrip():
    model = _lin()
    a = ADR(model, 4, total_steps=20, ema_decay=0.5)
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.1)
        a.after_step(model)
    b = ADR(_lin(seed=1), 4, total_steps=20, ema_decay=0.5)
    b.load_state_dict(a.state_dict())
    assert b.step == 3
    x = torch.randn(3, 6)
    assert torch.equal(a.teacher(x), b.teacher(x))


def test_adr_paper_presets():
    r = ADR.cifar100(_lin(c=100), total_steps=10)
    assert (r.tau_high, r.tau_low, r.lambda_low, r.lambda_high) == (1.5, 1.0, 0.7, 0.95)
    r = ADR.for_dataset("tiny_imagenet", _lin(c=200), 200, total_steps=10)
    assert (r.tau_high, r.tau_low, r.lambda_low, r.lambda_high) == (2.0, 1.5, 0.5, 0.9)


# ------------------------------------------------------------------ label smoothing / one-hot
def test_onehot_and_label_smoothing():
    y = torch.tensor([0, 2])
    t = OneHot(3).targets(torch.zeros(2, 1), y)
    assert torch.equal(t.distribution(), y)
    d = LabelSmoothing(3, 0.3).targets(torch.zeros(2, 1), y).distribution()
    assert torch.allclose(d[0], torch.tensor([0.8, 0.1, 0.1]))
    assert torch.allclose(d.sum(1), torch.ones(2))


# ------------------------------------------------------------------ SGLR (Eq. 6-8)
class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: x.shape[0]]


def test_sglr_memory_update_paper_variant():
    nat = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rect = SGLR(_Fixed(nat), 3, num_samples=5, variant="paper", alpha=0.2, temperature=1.5, momentum=0.9,
                clean_weight=0.2)
    y, idx = torch.tensor([0, 1]), torch.tensor([3, 1])
    t = rect.targets(torch.zeros(2, 1), y, index=idx)
    assert torch.equal(t.for_attack, y)                 # the attack uses the hard label
    s = t.distribution(logits_nat=nat, logits_adv=adv)
    q = 0.2 * torch.softmax(nat / 1.5, 1) + 0.8 * torch.softmax(adv / 1.5, 1)          # Eq. 7
    p = 0.8 * F.one_hot(y, 3).float() + 0.2 * q                                          # Eq. 6
    expect = 0.9 * F.one_hot(y, 3).float() + 0.1 * p                                    # Eq. 8, S0 = onehot
    assert torch.allclose(s, expect, atol=1e-6)
    assert rect.memory.abs().sum() == 0 and not rect.seen.any()  # written after the step, not before
    rect.after_step(None)
    assert torch.allclose(rect.memory[3], expect[0]) and torch.allclose(rect.memory[1], expect[1])
    assert rect.memory[0].abs().sum() == 0 and not rect.seen[0]
    # second visit averages with the stored value
    t2 = rect.targets(torch.zeros(2, 1), y, index=idx)
    s2 = t2.distribution(logits_nat=nat, logits_adv=adv)
    assert torch.allclose(s2, 0.9 * expect + 0.1 * p, atol=1e-6)
    # cached: a second loss call (AWP proxy pass, then the real pass) sees the same target
    assert torch.equal(t2.distribution(logits_nat=adv, logits_adv=nat), s2)


def test_sglr_code_variant_hard_until_start_epoch():
    nat = torch.tensor([[2.0, 0.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0, 0.0]])
    rect = SGLR(_Fixed(nat), 3, num_samples=2, variant="code", momentum=0.9, start_epoch=3)
    y, idx = torch.tensor([0]), torch.tensor([1])
    # the public code's `epoch >= es` with epochs 1, 2, ...: hard labels in epochs 1 and 2
    for _ in range(2):
        assert torch.equal(rect.targets(torch.zeros(1, 1), y, index=idx).distribution(), y)
        rect.end_epoch(None)
    s = rect.targets(torch.zeros(1, 1), y, index=idx).distribution(logits_nat=nat, logits_adv=adv)
    q = 0.2 * torch.softmax(nat, 1) + 0.8 * torch.softmax(adv, 1)        # T = 1, no one-hot mix
    assert torch.allclose(s, 0.9 * F.one_hot(y, 3).float() + 0.1 * q, atol=1e-6)


def test_sglr_start_epoch_defaults_and_counting():
    assert SGLR(_lin(c=3), 3, num_samples=2, variant="code").start_epoch == 90   # run_sgls.sh: ES=90
    assert SGLR(_lin(c=3), 3, num_samples=2, variant="paper").start_epoch == 0
    for es, first_soft_epoch in ((0, 0), (1, 0), (2, 1), (90, 89)):                # 0-based epochs
        rect = SGLR(_lin(c=3), 3, num_samples=2, variant="code", start_epoch=es)
        active = []
        for _ in range(first_soft_epoch + 2):
            active.append(rect.active)
            rect.end_epoch(None)
        assert active.index(True) == first_soft_epoch and all(active[first_soft_epoch:]), (es, active)


def test_sglr_step_without_after_step_leaves_memory_alone():
    """The trainer's non-finite-loss rollback skips after_step: the memory must not move."""
    nat = torch.tensor([[2.0, 0.0, 0.0]])
    rect = SGLR(_Fixed(nat), 3, num_samples=2)
    y, idx = torch.tensor([0]), torch.tensor([1])
    rect.targets(torch.zeros(1, 1), y, index=idx).distribution(logits_nat=nat, logits_adv=nat * float("nan"))
    t = rect.targets(torch.zeros(1, 1), y, index=idx)        # the next try of the step
    assert rect.memory.abs().sum() == 0 and not rect.seen.any()
    s = t.distribution(logits_nat=nat, logits_adv=nat)
    rect.after_step(None)
    assert torch.isfinite(rect.memory).all() and torch.equal(rect.memory[1], s[0]) and rect.seen[1]


def test_sglr_needs_index_and_checks_range():
    rect = SGLR(_lin(c=3), 3, num_samples=4)
    with pytest.raises(ValueError, match="index"):
        rect.targets(torch.zeros(1, 6), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        rect.targets(torch.zeros(1, 6), torch.tensor([0]), index=torch.tensor([4]))


def test_sglr_state_roundtrip_and_shape_check():
    a = SGLR(_lin(c=3), 3, num_samples=4)
    a.memory[2] = torch.tensor([0.5, 0.25, 0.25])
    a.seen[2] = True
    b = SGLR(_lin(c=3), 3, num_samples=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.memory, a.memory) and torch.equal(b.seen, a.seen)
    with pytest.raises(ValueError, match="memory shape"):
        SGLR(_lin(c=3), 3, num_samples=5).load_state_dict(a.state_dict())


# ------------------------------------------------------------------ KD self-teachers and LTD
def test_kd_term_equals_tempered_cross_entropy():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    T = 2.0
    expect = T * T * (-(torch.softmax(t / T, 1) * torch.log_softmax(s / T, 1)).sum(1)).mean()
    assert torch.allclose(kd_loss(s, t, T), expect, atol=1e-6)
    # and its gradient equals T^2 * KL's (they differ by the teacher entropy, a constant)
    s1 = s.clone().requires_grad_(True)
    kd_loss(s1, t, T).backward()
    s2 = s.clone().requires_grad_(True)
    (T * T * F.kl_div(F.log_softmax(s2 / T, 1), F.softmax(t / T, 1), reduction="batchmean")).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_kd_self_teachers_loss_is_weighted_sum_paper_and_code_weights():
    torch.manual_seed(0)
    robust, standard = nn.Linear(6, 4), nn.Linear(6, 4)
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    s_logits = torch.randn(7, 4)
    for weights, (l1, l2) in (("paper", (0.5, 0.25)), ("code", (0.6, 0.1))):
        kd = KDSelfTeachers(4, robust_teacher=robust, standard_teacher=standard, weights=weights, temperature=2.0)
        t = kd.targets(x, y)
        assert torch.equal(t.for_attack, y)   # attack with the hard label
        with torch.no_grad():
            expect = ((1 - l1 - l2) * F.cross_entropy(s_logits, y) + l1 * kd_loss(s_logits, robust(x), 2.0)
                      + l2 * kd_loss(s_logits, standard(x), 2.0))
        assert torch.allclose(t.loss(s_logits, x), expect, atol=1e-6)
    assert not robust.training and not any(p.requires_grad for p in robust.parameters())


def test_ltd_soft_labels_at_low_temperature():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4)
    ltd = LTD(teacher, 4, temperature=5.0)
    x, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
    t = ltd.targets(x, y)
    assert torch.allclose(t.distribution(), torch.softmax(teacher(x) / 5.0, 1))
    assert torch.equal(t.for_attack, y)
    logits = torch.randn(3, 4)
    assert torch.allclose(t.loss(logits), soft_cross_entropy(logits, t.distribution()))
    with pytest.raises(ValueError, match="classes"):
        LTD(nn.Linear(6, 5), 4).targets(x, y)


def test_soft_cross_entropy_equals_cross_entropy_on_onehot():
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y), atol=1e-6)
    assert math.isclose(soft_cross_entropy(logits, y).item(), F.cross_entropy(logits, y).item(), rel_tol=1e-6)
