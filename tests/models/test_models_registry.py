"""Model registry and every registered model family."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from nestedsparse import models
from nestedsparse.models.mobilenet import make_divisible

EXPECTED = {"lenet5", "mlp", "mlp_1024", "mobilenet_v1", "resnet20", "resnet32", "resnet56", "wrn"}


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Batch-2 forwards are faster on one thread and immune to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def forward(model: nn.Module, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, *model.input_shape, dtype=dtype))


def test_registry_lists_all_families() -> None:
    assert set(models.list_models()) >= EXPECTED
    assert models.list_models() == sorted(models.list_models())


@pytest.mark.parametrize("name", models.list_models())
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    out = forward(models.create(name))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.list_models())
def test_odd_num_classes_and_dtype(name: str) -> None:
    model = models.create(name, num_classes=7, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert forward(model, dtype=torch.float64).shape == (2, 7)


@pytest.mark.parametrize("name", models.list_models())
def test_device_reaches_every_layer(name: str) -> None:
    model = models.create(name, device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_train_mode_backward() -> None:
    model = models.create("resnet20", in_channels=1)
    loss = model(torch.randn(2, 1, 28, 28)).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        models.create("nope")
    for name in models.list_models():
        assert name in str(info.value)


def test_unknown_kwargs_are_named() -> None:
    with pytest.raises(TypeError, match=r"\['colour', 'depht'\].*accepts: .*'depth'"):
        models.create("wrn", depht=16, colour="red")


def test_register_model_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("mlp")(lambda num_classes=10: nn.Linear(1, num_classes))


def test_resnet_structure() -> None:
    model = models.create("resnet20")
    assert model.blocks_per_stage == 3
    for stage in ("layer1", "layer2", "layer3"):
        assert isinstance(getattr(model, stage), nn.Sequential) and len(getattr(model, stage)) == 3
    assert models.create("resnet56", device="meta").blocks_per_stage == 9


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_on_one_channel_28x28(shortcut: str) -> None:
    model = models.create("resnet20", in_channels=1, num_classes=7, shortcut=shortcut).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert len(projections) == (2 if shortcut == "B" else 0)


def test_resnet_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shortcut must be one of"):
        models.create("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        models.resnet.CifarResNet(depth=21)


def test_wrn_structure() -> None:
    model = models.create("wrn", depth=10, width=2, device="meta")
    assert model.blocks_per_stage == 1
    assert model.layer3[0].conv2.out_channels == 128
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        models.create("wrn", depth=15)


def test_lenet5_structure() -> None:
    model = models.create("lenet5")
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier, nn.Sequential)
    assert model.classifier[0].in_features == 800 and model.classifier[0].out_features == 500
    assert models.create("lenet5", image_size=32, in_channels=3).classifier[0].in_features == 1250


def test_mlp_structure() -> None:
    widths = [m.out_features for m in models.create("mlp").modules() if isinstance(m, nn.Linear)]
    assert widths == [300, 100, 10]
    first = next(m for m in models.create("mlp_1024").modules() if isinstance(m, nn.Linear))
    assert first.in_features == 784 and first.out_features == 1024
    assert models.mlp.MLP(6, (4,), 3, input_shape=(2, 3))(torch.randn(2, 2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        models.create("mlp", num_classes=0)


def test_mobilenet_width_mult_quarter() -> None:
    model = models.create("mobilenet_v1", width_mult=0.25, num_classes=7)
    assert forward(model).shape == (2, 7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 and c.out_channels >= 8 for c in convs)
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13 and all(c.groups == c.in_channels for c in depthwise)
    assert model.classifier.in_features == 256


def test_make_divisible() -> None:
    assert make_divisible(32 * 0.25) == 8
    assert make_divisible(32 * 0.1) == 8
    assert make_divisible(100) == 104
    assert make_divisible(1024 * 0.75) == 768
    with pytest.raises(ValueError, match="width_mult"):
        models.create("mobilenet_v1", width_mult=0)
