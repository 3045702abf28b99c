"""Model registry, RobustBench/timm adapters and the normalising wrapper."""
import pytest
import torch
from torch import nn

from _extras import need
from rb_labelrefine.models import (
    NormalizedModel, build_model, count_parameters, create_model, is_model, list_models,
    register_model, wrap_module,
)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("small_cnn", dict(in_channels=1, image_size=28), (2, 1, 28, 28)),
    ("small_cnn", dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    ("tiny_cnn", dict(in_channels=3, image_size=32), (2, 3, 32, 32)),
    ("mlp", dict(in_channels=1, image_size=8), (2, 1, 8, 8)),
    ("mlp", dict(in_channels=3, image_size=8, batch_norm=True), (2, 3, 8, 8)),
    ("preact_resnet18", dict(), (2, 3, 32, 32)),
    ("resnet18", dict(), (2, 3, 32, 32)),
    ("preact_resnet18", dict(in_channels=1), (2, 1, 32, 32)),
    ("wrn", dict(depth=16, width=1), (2, 3, 32, 32)),
    ("wrn", dict(depth=10, widen_factor=2, in_channels=1), (2, 1, 32, 32)),
    ("timm:resnet10t", dict(), (2, 3, 32, 32)),
    ("timm:test_efficientnet", dict(in_channels=1), (2, 1, 32, 32)),
])
def test_registry_forward_shapes(name, kwargs, shape):
    if name.startswith("timm:"):
        need("timm")
    elif name in ("preact_resnet18", "resnet18", "wrn"):
        need("robustbench")                     # RobustBench's own classes
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs)
    model.train()
    out = model(torch.rand(shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_wrn_34_10_construction_and_forward():
    need("robustbench")
    model = create_model("wrn_34_10", num_classes=10).eval()
    assert count_parameters(model) == 46_160_474
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_robustbench_archs_are_robustbench_classes():
    need("robustbench")
    from rb_labelrefine.compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActResNet, ResNet
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    assert isinstance(create_model("preact_resnet18", 10), PreActResNet)
    assert isinstance(create_model("resnet18", 100), ResNet)
    wrn = create_model("wrn", 10, depth=16, width=2)
    assert isinstance(wrn, WideResNet) and wrn.fc.out_features == 10
    assert count_parameters(create_model("preact_resnet18", 10)) == 11_171_146


def test_robustbench_archs_reject_other_image_sizes_and_depths():
    with pytest.raises(ValueError, match="32x32.*timm"):
        create_model("preact_resnet18", 10, image_size=64)
    with pytest.raises(ValueError, match="32x32"):
        create_model("wrn_34_10", 10, image_size=28)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn", 10, depth=20)


def test_small_cnn_matches_spec():
    model = create_model("small_cnn", 10, in_channels=1, image_size=28)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 256), (256, 10)]
    assert count_parameters(model) == 824_554
    assert 2_000 <= count_parameters(create_model("tiny_cnn", 10)) <= 10_000


def test_unknown_names():
    need("timm")
    with pytest.raises(ValueError, match="unknown model 'resnet999'.*timm:"):
        create_model("resnet999", 10)
    with pytest.raises(ValueError, match="timm has no model 'resnet10tt'"):
        create_model("timm:resnet10tt", 10)
    assert is_model("small_cnn") and is_model("timm:anything") and not is_model("nope")
    assert {"small_cnn", "tiny_cnn", "mlp", "preact_resnet18", "resnet18", "wrn_34_10"} <= set(list_models())
    assert list_models("wrn_*") == ["wrn_28_10", "wrn_34_10", "wrn_70_16"]


def test_register_custom_model():
    @register_model(name="_test_linear")
    def _net(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

    assert create_model("_test_linear", 3, in_channels=1, image_size=4)(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="_test_linear")


def test_normalized_model_equals_manual_normalisation():
    torch.manual_seed(0)
    inner = create_model("tiny_cnn", 10).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    model = NormalizedModel(inner, mean, std).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(model(x), manual, atol=1e-6)
    assert model.model is inner
    keys = list(model.state_dict())
    assert keys[:2] == ["mean", "std"] and all(k.startswith("model.") for k in keys[2:])
    model.double()
    assert model.mean.dtype == torch.float64 and model(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="positive"):
        NormalizedModel(inner, (0.5,), (0.0,))


def test_wrap_module_and_build_model():
    need("timm")
    user_net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    wrapped = wrap_module(user_net)
    x = torch.rand(2, 3, 2, 2)
    assert torch.equal(wrapped(x), user_net(x)) and wrap_module(wrapped) is wrapped
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=(0.3049,), std=(0.3759,))
    assert isinstance(model, NormalizedModel) and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    timm_model = build_model("timm:test_efficientnet", 5, 3, 32, (0.5,) * 3, (0.25,) * 3)
    assert timm_model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert isinstance(build_model(user_net, 2, 3, 2, (0.5,), (0.5,)), NormalizedModel)
    with pytest.raises(ValueError, match="mean/std"):
        build_model("tiny_cnn", 10, 3, 32, (0.1, 0.2), (1.0, 1.0))


def test_small_cnn_backward_step_learns():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 8, (0.3049,), (0.3759,))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    losses = []
    for _ in range(5):  # plain SGD by hand: torch.optim's first use costs seconds of imports
        loss = nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.mean.grad is None and not model.mean.requires_grad  # buffers, never trained
