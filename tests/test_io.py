import json
import struct

import pytest
import torch
from torch import nn

import nestedsparse as ns
from nestedsparse.io import CheckpointError, read_meta


def _model():
    torch.manual_seed(0)
    a = nn.Linear(6, 6)
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), a,
                      nn.ReLU(), nn.Linear(6, 6))
    m[8].weight = a.weight  # tied
    ns.nestify_(m, ns.LevelSpec((0.3, 0.6, 1.0)))
    return m


def test_save_load_bit_exact_with_tied_weights(tmp_path):
    m = _model()
    m(torch.randn(4, 2, 6))  # move BN stats of the top level
    path = tmp_path / "m.safetensors"
    ns.save(m, path, extra={"model": "custom"})
    m2 = ns.load(path, lambda: _model_fresh())
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert m2[6].parametrizations.weight.original is m2[8].parametrizations.weight.original
    assert read_meta(path)["extra"] == {"model": "custom"}
    x = torch.randn(2, 2, 6)
    m.eval(), m2.eval()
    for k in range(3):
        with ns.use_level(m, k), ns.use_level(m2, k):
            assert torch.equal(m(x), m2(x))


def _model_fresh():
    torch.manual_seed(123)
    a = nn.Linear(6, 6)
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), a,
                      nn.ReLU(), nn.Linear(6, 6))
    m[8].weight = a.weight
    return m


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    m = _model()
    path = tmp_path / "m.safetensors"
    ns.save(m, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("nestedsparse.io.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ns.save(_model_fresh_nested(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _model_fresh_nested():
    m = _model_fresh()
    ns.nestify_(m, ns.LevelSpec((0.3, 0.6, 1.0)))
    return m


@pytest.mark.parametrize("corrupt", ["truncate", "garbage", "header_len", "no_meta", "bad_version", "bad_level"])
def test_corrupt_files_raise_clear_error(tmp_path, corrupt):
    m = _model()
    path = tmp_path / "m.safetensors"
    ns.save(m, path)
    data = bytearray(path.read_bytes())
    if corrupt == "truncate":
        data = data[: len(data) // 2]
    elif corrupt == "garbage":
        data = bytearray(b"\x00" * 64)
    elif corrupt == "header_len":
        data[:8] = struct.pack("<Q", 2**62)
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["nestedsparse"])
        if corrupt == "no_meta":
            save_file(tensors, str(path))
        elif corrupt == "bad_version":
            meta["version"] = 99
            save_file(tensors, str(path), metadata={"nestedsparse": json.dumps(meta)})
        else:
            key = next(k for k in tensors if k.endswith("level_map"))
            tensors[key] = torch.full_like(tensors[key], 200)
            save_file(tensors, str(path), metadata={"nestedsparse": json.dumps(meta)})
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path.name)):
        ns.load(path, _model_fresh)


def test_load_refuses_other_spec(tmp_path):
    path = tmp_path / "m.safetensors"
    ns.save(_model(), path)
    other = _model_fresh()
    ns.nestify_(other, ns.LevelSpec((0.5, 1.0)))
    with pytest.raises(CheckpointError, match="file has levels"):
        ns.load_into_(other, path)
