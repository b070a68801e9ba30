"""Files: safetensors tensors + JSON metadata with a format name and version; never pickle.

Every write goes to a temporary file in the target folder, is flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows), so a crash mid-write leaves the
old file intact. Every read checks the format name and version and turns any parse failure of an
untrusted file into :class:`CheckpointError` naming the file and the fault.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from .levels import LevelSpec
from .nest import get_spec, is_nested, nestify_

__all__ = ["CheckpointError", "atomic_write_bytes", "write_tensors", "read_tensors", "save", "load", "load_into_"]

MODEL_FORMAT = "nestedsparse.model"
MODEL_VERSION = 2  # 2: records a layer schedule ("depth"); files without one are still written as 1
_META_KEY = "nestedsparse"


class CheckpointError(ValueError):
    """A file that is not a valid nestedsparse file (corrupt, truncated, wrong format/version)."""


def _umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``) where the OS allows;
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a written file follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dedupe(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied weights); return (unique, alias -> kept name)."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    return unique, aliases


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` (aliases stored once) and JSON ``meta`` as a safetensors file."""
    unique, aliases = _dedupe(tensors)
    meta = {**meta, "aliases": aliases}
    atomic_write_bytes(path, st_save(unique, metadata={_META_KEY: json.dumps(meta)}))


def read_tensors(path: str | os.PathLike, fmt: str, versions: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write_tensors`, checking its format name and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types on corrupt headers / data
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if raw_meta is None:
        raise CheckpointError(f"{path}: no nestedsparse metadata; expected a file written by nestedsparse")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {got!r}, expected {fmt!r}")
    if meta.get("version") not in versions:
        raise CheckpointError(f"{path}: {fmt} version {meta.get('version')!r} is not supported (supported: {versions})")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or any(v not in tensors for v in aliases.values()):
        raise CheckpointError(f"{path}: alias table names tensors that are not in the file")
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors, meta


def save(model: nn.Module, path: str | os.PathLike, extra: Mapping | None = None) -> None:
    """Save a nested model (dense weights, level maps, per-level BatchNorm, spec) atomically.

    Args:
        model: a nested model.
        path: target file (``.safetensors``).
        extra: JSON-ready facts to keep beside it (e.g. ``{"model": "lenet5", "model_kwargs": {}}``).
    """
    from .structure.depth import depth_schedule  # noqa: PLC0415

    spec = get_spec(model)
    meta = {"format": MODEL_FORMAT, "version": 1, "spec": spec.to_dict(), "extra": dict(extra or {})}
    depth = depth_schedule(model)
    if depth:  # layer scheduling: which blocks each level skips (load_into_ gates them again)
        meta.update(depth=depth, version=MODEL_VERSION)
    write_tensors(path, model.state_dict(), meta)


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a saved model (spec, extra) without building the model."""
    return read_tensors(path, MODEL_FORMAT, (1, MODEL_VERSION))[1]


def load_into_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved nested model into ``model`` (nested here with the file's spec if it is not yet)."""
    tensors, meta = read_tensors(path, MODEL_FORMAT, (1, MODEL_VERSION))
    try:
        spec = LevelSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid level spec in metadata ({e})") from None
    if not is_nested(model):
        nestify_(model, spec)
    elif get_spec(model) != spec:
        raise CheckpointError(f"{path}: file has levels {spec.densities}, the model {get_spec(model).densities}")
    _apply_depth(model, meta.get("depth"), path)
    _load_state_checked(model, tensors, path)
    from .structure.depth import clamp_gated_maps_  # noqa: PLC0415 - files from before the clamp existed

    clamp_gated_maps_(model)
    return model


def _apply_depth(model: nn.Module, depth, path) -> None:
    """Gate the blocks a file's layer schedule names (or check the model's own gates equal it)."""
    from .structure.depth import depth_schedule, gate_blocks_  # noqa: PLC0415

    depth = depth or {}
    if not isinstance(depth, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in depth.items()):
        raise CheckpointError(f"{path}: invalid layer schedule in metadata (expected {{block name: min level}})")
    own = depth_schedule(model)
    if own:
        if own != depth:
            raise CheckpointError(f"{path}: file's layer schedule {depth} differs from the model's {own}")
        return
    if depth:
        try:  # the shape check runs when the model names its input shape (the registry's do)
            gate_blocks_(model, depth, check=hasattr(model, "input_shape"))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: layer schedule does not fit the model: {e}") from None


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with ``model_factory()`` and load a saved nested model into it."""
    return load_into_(model_factory(), path)


def _load_state_checked(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, t in tensors.items():
        if t.shape != own[k].shape or t.dtype != own[k].dtype:
            raise CheckpointError(
                f"{path}: tensor {k!r} is {t.dtype}{tuple(t.shape)}, the model needs {own[k].dtype}{tuple(own[k].shape)}"
            )
        if k.endswith("level_map") and t.numel() and int(t.max()) > get_spec(model).num_levels:
            raise CheckpointError(f"{path}: level map {k!r} holds values above L={get_spec(model).num_levels}")
    model.load_state_dict(tensors, strict=True)
