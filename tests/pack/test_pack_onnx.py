"""Export each level of a packed model to ONNX: ONNX Runtime equals the runtime within 1e-4."""
import pytest
import torch
from torch import nn

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import iter_nested_bn, nestify_
from nestedsparse.pack import load_packed, pack
from nestedsparse.pack.onnx import ChannelAffine, dense_model_for_level, export_level

SPEC = LevelSpec((0.1, 0.4, 1.0))


def _randomise_bn(model):
    """Different running stats per level, so a wrong level's BatchNorm shows."""
    g = torch.Generator().manual_seed(1)
    for _, bn in iter_nested_bn(model):
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))


def _packed_file(tmp_path, model, name=None, kwargs=None):
    nestify_(model, SPEC)
    _randomise_bn(model)
    path = tmp_path / "m.nsp"
    pack(model, model_name=name, model_kwargs=kwargs).save(path)
    return path


@pytest.fixture
def lenet_file(tmp_path):
    torch.manual_seed(0)
    return _packed_file(tmp_path, models.create("lenet5", image_size=16), "lenet5", {"image_size": 16})


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(2, 5, 3, padding=1, stride=2), nn.BatchNorm1d(5), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(25, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("with_bn", ["lenet", "tiny_conv", "conv1d"])
def test_dense_model_for_level_equals_runtime(tmp_path, tiny_conv, with_bn):
    torch.manual_seed(0)
    if with_bn == "lenet":
        path, factory, shape = _packed_file(tmp_path, models.create("lenet5", image_size=16), "lenet5",
                                            {"image_size": 16}), None, (1, 16, 16)
    elif with_bn == "tiny_conv":
        path, factory, shape = _packed_file(tmp_path, tiny_conv), type(tiny_conv), (3, 8, 8)
    else:
        path, factory, shape = _packed_file(tmp_path, Conv1dNet()), Conv1dNet, (2, 10)
    rt = load_packed(path, factory)
    x = torch.randn(3, *shape)
    outs = []
    for k in range(SPEC.num_levels):
        dense = dense_model_for_level(rt, k)
        assert not any(isinstance(m, type(rt.sparse_layers()[0])) for m in dense.modules())
        assert all(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) for m in dense.modules() if hasattr(m, "weight")
                   and not isinstance(m, ChannelAffine))
        with torch.no_grad():
            y = dense(x)
        ref = rt(x, level=k)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        outs.append(ref)
    assert not torch.allclose(outs[0], outs[-1])  # the levels really differ


def test_export_every_level_lenet(tmp_path, lenet_file):
    ort = pytest.importorskip("onnxruntime")
    rt = load_packed(lenet_file)
    x = torch.randn(5, 1, 16, 16)  # another batch size than the export's: the batch axis is dynamic
    for k in range(SPEC.num_levels):
        out = tmp_path / f"l{k}.onnx"
        err = export_level(lenet_file, k, out)
        assert 0.0 <= err <= 1e-4
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, rt(x, level=k), atol=1e-4, rtol=1e-4)


def test_export_conv_bn_model(tmp_path, tiny_conv):
    pytest.importorskip("onnxruntime")
    path = _packed_file(tmp_path, tiny_conv)
    for k in range(SPEC.num_levels):
        err = export_level(path, k, tmp_path / f"c{k}.onnx", model_factory=type(tiny_conv), input_shape=(3, 8, 8))
        assert 0.0 <= err <= 1e-4


def test_export_slim_channel_levels(tmp_path):
    """A channel-scheduled level exports as its thin dense network: a smaller file, same outputs."""
    ort = pytest.importorskip("onnxruntime")
    from nestedsparse.structure import ChannelSelector

    torch.manual_seed(0)
    m = models.create("resnet20", in_channels=3)
    nestify_(m, SPEC)
    ChannelSelector((0.25, 0.5, 1.0)).apply_(m)
    _randomise_bn(m)
    path = tmp_path / "r.nsp"
    pack(m, model_name="resnet20", model_kwargs={"in_channels": 3}).save(path)
    rt = load_packed(path)
    x = torch.randn(3, 3, 32, 32)
    sizes = {}
    for k in (0, 2):
        for slim in (False, True):
            out = tmp_path / f"l{k}{'s' if slim else ''}.onnx"
            assert 0.0 <= export_level(path, k, out, slim=slim) <= 1e-4
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
            torch.testing.assert_close(got, rt(x, level=k), atol=1e-4, rtol=1e-4)
            sizes[k, slim] = out.stat().st_size
    assert sizes[0, True] < 0.1 * sizes[0, False]  # a quarter of the channels: ~1/16 of the weights
    assert abs(sizes[2, True] - sizes[2, False]) < 0.01 * sizes[2, False]  # the full width: nothing to drop


def test_export_rejects_bad_level_and_missing_shape(tmp_path, tiny_conv, lenet_file):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError):
        export_level(lenet_file, SPEC.num_levels, tmp_path / "bad.onnx")
    path = _packed_file(tmp_path, tiny_conv)
    with pytest.raises(ValueError, match="input shape"):
        export_level(path, 0, tmp_path / "c.onnx", model_factory=type(tiny_conv))


def test_export_detects_a_mismatch(tmp_path, lenet_file, monkeypatch):
    pytest.importorskip("onnxruntime")
    from nestedsparse.pack import onnx as ponnx

    real = ponnx.dense_model_for_level
    monkeypatch.setattr(ponnx, "dense_model_for_level", lambda rt, k: real(rt, (k + 1) % SPEC.num_levels))
    with pytest.raises(ValueError, match="exceeds"):
        export_level(lenet_file, 0, tmp_path / "wrong.onnx")
