"""Training checkpoints: model, optimizer, selector, RNG and progress in one atomic file.

Layout: safetensors tensors ``model/<name>``, ``optim/<param index>/<key>``, ``rng/<name>`` and
JSON metadata (``format = nestedsparse.checkpoint``, version, epoch, step, history, the
optimizer's non-tensor state, the selector's state). Written every epoch, read on ``resume``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import CheckpointError, read_tensors, write_tensors
from ..nest import get_spec

FORMAT, VERSION = "nestedsparse.checkpoint", 1
FILENAME = "checkpoint.safetensors"


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    out["rng/numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    return out


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:
    """Write ``run_dir/checkpoint.safetensors`` atomically; ``state`` is JSON-ready progress."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{idx}/{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors.update(_rng_tensors())
    meta = {
        "format": FORMAT, "version": VERSION, "spec": get_spec(model).to_dict(), **state,
        "optim": {"param_groups": opt["param_groups"], "scalars": scalars},
        "py_random": _py_random_state(),
        "np_random": list(np.random.get_state()[2:]),
    }
    path = Path(run_dir) / FILENAME
    write_tensors(path, tensors, meta)
    return path


def _py_random_state() -> list:
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def load_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from ``run_dir``; return the JSON progress state."""
    path = Path(run_dir) / FILENAME
    tensors, meta = read_tensors(path, FORMAT, (VERSION,))
    if meta.get("spec") != get_spec(model).to_dict():
        raise CheckpointError(f"{path}: saved with levels {meta.get('spec')}, this run has {get_spec(model).to_dict()}")
    msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(msd, strict=True)
        from ..structure.depth import clamp_gated_maps_  # noqa: PLC0415 - runs from before the clamp existed

        clamp_gated_maps_(model)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: model state does not fit this model ({e})") from None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, sc in meta["optim"]["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optim"]["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/numpy" in tensors:
        np_state = np.random.get_state()
        pos, has_gauss, gauss = meta.get("np_random", [624, 0, 0.0])
        np.random.set_state((np_state[0], tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, gauss = meta["py_random"]
    random.setstate((v, tuple(internal), gauss))
    return meta
