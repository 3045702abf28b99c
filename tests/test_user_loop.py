"""The README's user loop runs unchanged for every method, with torchattacks' PGD on a tiny
model, and each method's state moves the way the method says it does."""
import copy

import pytest
import torch
import torch.nn as nn

import rb_labelrefine as rl
from _extras import need

torchattacks = need("torchattacks")                 # the README loop is a torchattacks user's

from rb_labelrefine.data import IndexedDataset
from rb_labelrefine.rectifiers import method_names

C, N, BATCH, EPOCHS = 4, 96, 32, 3


def _task(seed=0):
    """A learnable task: labels from a fixed linear map of the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, 6, 6, generator=g)
    w = torch.randn(36, C, generator=g)
    y = ((x.flatten(1) - 0.5) @ w).argmax(1)
    data = IndexedDataset(torch.utils.data.TensorDataset(x, y))
    return data, torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, C))


def _teacher(data, seed=2):
    """A frozen teacher fitted (clean, briefly) to the task."""
    t = _model(seed)
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    x, y = data.dataset.tensors
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(t(x), y).backward()
        opt.step()
    return t.eval()


def _run(rect, model, loader, *, on_step=None):
    """The README loop, line for line (device: the CPU); returns the mean loss of each epoch."""
    device = "cpu"
    rect = rect.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    atk = torchattacks.PGD(model, eps=8/255, alpha=2/255, steps=3)
    losses = []
    for epoch in range(EPOCHS):
        total = 0.0
        for x, y, idx in loader:
            x, y = x.to(device), y.to(device)
            target = rect.targets(x, y, index=idx)
            x_adv = atk(x, target.for_attack)
            loss = target.loss(model(x_adv), x_adv)
            opt.zero_grad(); loss.backward(); opt.step()
            rect.after_step(model)
            assert torch.isfinite(loss)
            total += float(loss.detach()) * y.shape[0]
            if on_step is not None:
                on_step(epoch, idx, target)
        rect.end_epoch(model)
        losses.append(total / N)
    assert rect.step == EPOCHS * len(loader) and rect.epoch == EPOCHS
    return losses


def test_every_registered_method_has_a_user_loop_test():
    tested = {"onehot", "label_smoothing", "adr", "sglr", "ltd", "kd"}
    assert set(method_names()) == tested


def test_onehot():
    data, loader = _task()
    losses = _run(rl.OneHot(C), _model(), loader)
    assert losses[-1] < losses[0], losses


def test_label_smoothing():
    data, loader = _task()
    seen = []
    losses = _run(rl.LabelSmoothing(C, 0.2), _model(), loader,
                  on_step=lambda e, idx, t: seen.append(t.distribution().max(1).values))
    assert torch.allclose(torch.cat(seen), torch.full((N * EPOCHS,), 0.8 + 0.2 / C))
    assert losses[-1] < losses[0], losses


def test_adr_teacher_moves_and_schedules_end_at_their_targets():
    data, loader = _task()
    model = _model()
    rect = rl.ADR(model, C, total_steps=EPOCHS * len(loader), ema_decay=0.9)
    start = copy.deepcopy(rect.teacher.module.state_dict())
    losses = _run(rect, model, loader)
    moved = [k for k, v in rect.teacher.module.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "4.weight" in moved and "2.running_mean" in moved   # EMA of parameters and buffers
    assert rect.temperature == pytest.approx(2.0) and rect.interpolation == pytest.approx(0.95)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sglr_memory_rows_of_the_batch_change(variant):
    data, loader = _task()
    model = _model()
    # the code form: hard labels in epoch 1 (its `epoch >= es` with es = 2), soft from epoch 2
    rect = rl.SGLR(model, C, num_samples=len(data), variant=variant,
                   **({"start_epoch": 2} if variant == "code" else {}))
    prev = [rect.memory.clone()]
    soft_steps = []

    def on_step(epoch, idx, target):
        mem, others = rect.memory, torch.ones(len(data), dtype=torch.bool)
        others[idx] = False
        assert torch.equal(mem[others], prev[0][others])          # only the batch's rows are written
        if variant == "code" and epoch == 0:
            assert torch.equal(mem, prev[0]) and not rect.seen.any() and target.distribution().dim() == 1
        else:
            assert not torch.equal(mem[idx], prev[0][idx]) and rect.seen[idx].all()
            assert torch.equal(mem[idx], target.distribution())    # the rows the loss trained towards
            onehot = nn.functional.one_hot(data.dataset.tensors[1][idx], C).float()
            assert (mem[idx] - onehot).abs().sum(1).gt(0).all()   # refined away from the one-hot label
            assert torch.allclose(mem[idx].sum(1), torch.ones(len(idx)), atol=1e-5)
            soft_steps.append(epoch)
        prev[0] = mem.clone()
    _run(rect, model, loader, on_step=on_step)
    assert len(soft_steps) == (EPOCHS - (variant == "code")) * len(loader) and rect.seen.all()


def test_ltd_targets_are_the_tempered_teacher():
    data, loader = _task()
    teacher = _teacher(data)
    w0 = copy.deepcopy(teacher.state_dict())
    checks = []

    def on_step(epoch, idx, target):
        x = data.dataset.tensors[0][idx]
        with torch.no_grad():
            checks.append(torch.allclose(target.distribution(), torch.softmax(teacher(x) / 5.0, 1), atol=1e-6))
    losses = _run(rl.LTD(teacher, C, temperature=5.0), _model(), loader, on_step=on_step)
    assert all(checks) and all(torch.equal(v, w0[k]) for k, v in teacher.state_dict().items())  # frozen
    assert losses[-1] < losses[0], losses


def test_kd_self_teachers():
    data, loader = _task()
    robust, standard = _teacher(data, seed=3), _teacher(data, seed=4)
    w0 = copy.deepcopy(robust.state_dict())
    rect = rl.KDSelfTeachers(C, robust_teacher=robust, standard_teacher=standard, weights="code")
    losses = _run(rect, _model(), loader)
    assert all(torch.equal(v, w0[k]) for k, v in robust.state_dict().items())
    assert not any(p.requires_grad for p in standard.parameters())
    assert losses[-1] < losses[0], losses


def test_to_moves_every_piece_of_state_the_rectifier_owns():
    """``rect.to(device)`` moves the EMA teacher, the frozen teachers and SGLR's memory (the
    ``meta`` device stands in for an accelerator); stateless rectifiers return themselves."""
    data, _ = _task()
    meta = torch.device("meta")
    model = _model()
    cases = {
        "onehot": (rl.OneHot(C), []),
        "label_smoothing": (rl.LabelSmoothing(C), []),
        "adr": (rl.ADR(model, C, total_steps=4), lambda r: list(r.teacher.module.state_dict().values())),
        "sglr": (rl.SGLR(model, C, num_samples=N), lambda r: [r.memory, r.seen]),
        "ltd": (rl.LTD(_model(), C), lambda r: list(r.teacher.state_dict().values())),
        "kd": (rl.KDSelfTeachers(C, robust_teacher=_model(), standard_teacher=_model()),
               lambda r: list(r.robust_teacher.state_dict().values()) + list(r.standard_teacher.state_dict().values())),
    }
    assert set(cases) == set(method_names())
    for name, (rect, owned) in cases.items():
        assert rect.to(meta) is rect, name
        tensors = owned(rect) if callable(owned) else owned
        assert all(t.device == meta for t in tensors), name
    assert all(p.device.type == "cpu" for p in model.parameters())   # the student is the user's to move
