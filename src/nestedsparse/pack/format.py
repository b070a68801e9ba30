"""The packed file: every level of a nested model in one safetensors file, checked on load.

Contents (format ``nestedsparse.packed``, version 1, 2 or 3):
- per nested layer ``<name>``: the NestedCSR arrays ``csr/<name>/{row_offsets, level_counts,
  col_indices, values[, scales]}`` (a sparser level is a prefix of every row, see ``csr.py``);
  a level segment that is smaller as a bit per column than as an index per entry is stored as a
  bitmap in ``csr/<name>/col_bitmap`` (its levels in the layer's ``bitmap_levels``), and the
  lowest complete level (``implied_level``: every weight, e.g. a dense top level) stores no
  columns at all: they are the ones the levels below leave out (``csr.column_coding``); loading
  rebuilds the in-memory NestedCSR the kernels read;
- ``dense/<key>``: every other tensor of the model's state (biases, per-level BatchNorm, layers
  left dense);
- JSON metadata: the level spec, the model's registry name and kwargs, per-layer kind / shape /
  conv geometry, tied layers, and a SHA-256 of every tensor's bytes.

Loading trusts nothing: safetensors parse errors, metadata shape, dtypes, array shapes, offsets,
level counts, column ranges, value finiteness (``csr.validate``) and the checksums are checked
before any kernel sees an array; any fault is a :class:`PackedFormatError` naming the layer.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import CheckpointError, read_tensors, write_tensors
from ..levels import LevelSpec
from ..nest import dense_weight, get_spec, iter_nested
from .csr import NestedCSR, NestedCSRError, decode_columns, encode_columns, from_dense, validate

__all__ = ["PackedFormatError", "PackedLayer", "PackedModel", "pack", "read_packed", "FORMAT", "VERSION"]

# version 2: the file records a layer schedule or a collapse recipe (a version-1 reader would build a
# different network); version 3: some level's columns are stored as a bitmap. A file is written with
# the lowest version that holds it, so older readers still read what they can.
FORMAT, VERSION = "nestedsparse.packed", 3
KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
_CSR_FIELDS = ("row_offsets", "level_counts", "col_indices", "values", "scales")
_STORED_FIELDS = _CSR_FIELDS + ("col_bitmap",)


class PackedFormatError(ValueError):
    """A packed file that is malformed, corrupt or hostile; the message names the layer and fault."""


@dataclass
class PackedLayer:
    """One nested layer: its NestedCSR and the geometry needed to run it."""

    kind: str  # "linear" | "conv1d" | "conv2d"
    weight_shape: tuple[int, ...]
    csr: NestedCSR
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    groups: int = 1

    def meta(self) -> dict:
        """JSON-ready geometry."""
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "groups": self.groups,
                "dtype": self.csr.dtype, "num_levels": self.csr.num_levels}


@dataclass
class PackedModel:
    """Every level of a nested model: packed layers, the other tensors, the spec, the model's name."""

    spec: LevelSpec
    layers: dict[str, PackedLayer]
    dense: dict[str, torch.Tensor]
    ties: dict[str, str] = field(default_factory=dict)
    model_name: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    collapse: dict | None = None  # the layer-sparsity merges that built the architecture (structure.rebuild)
    depth: dict = field(default_factory=dict)  # layer scheduling: {block name: min level} (structure.depth)
    input_shape: tuple[int, ...] | None = None  # one sample's shape (set on the model load_packed builds)

    def dense_bytes(self) -> int:
        """Bytes of the tensors every level needs (biases, BatchNorm, unpruned layers)."""
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    def level_bytes(self, level: int) -> int:
        """Bytes a file holding levels ``0 .. level`` stores (the dense tensors + every layer's
        ``NestedCSR.stored_nbytes(level)``): what ``level`` alone needs on disk."""
        return self.dense_bytes() + sum(pl.csr.stored_nbytes(level) for pl in self.layers.values())

    def total_bytes(self) -> int:
        """Bytes of all arrays the file stores (every level; the file adds its JSON header)."""
        return self.dense_bytes() + sum(pl.csr.stored_nbytes() for pl in self.layers.values())

    def plain_csr_bytes(self, level: int) -> int:
        """Bytes of a plain single-level CSR of ``level`` (same dtypes) + the dense tensors."""
        return self.dense_bytes() + sum(pl.csr.plain_csr_nbytes(level) for pl in self.layers.values())

    def kept(self, level: int) -> float:
        """The share of the packed layers' weights ``level`` keeps (its real density, beside the
        spec's)."""
        total = sum(pl.csr.shape[0] * pl.csr.shape[1] for pl in self.layers.values())
        return sum(pl.csr.nnz(level) for pl in self.layers.values()) / max(total, 1)

    def size_table(self) -> list[dict]:
        """Rows per level: nnz and the bytes a file of levels ``0 .. k`` stores (``level_bytes``);
        then the whole file's arrays (``total_bytes``) over a plain single-level CSR of the densest
        level with every column index stored (``vs_plain_csr_densest``)."""
        rows = []
        for k in range(self.spec.num_levels):
            nnz = sum(pl.csr.nnz(k) for pl in self.layers.values())
            rows.append({"level": k, "density": round(self.kept(k), 4), "spec_density": self.spec.densities[k],
                         "nnz": nnz, "bytes": self.level_bytes(k)})
        top = self.spec.num_levels - 1
        rows.append({"level": "all", "density": "", "spec_density": "", "nnz": rows[-1]["nnz"],
                     "bytes": self.total_bytes(),
                     "vs_plain_csr_densest": round(self.total_bytes() / self.plain_csr_bytes(top), 4)})
        return rows

    def save(self, path: str | os.PathLike) -> None:
        """Write the packed file atomically."""
        tensors: dict[str, torch.Tensor] = {}
        layers_meta, coded = {}, False
        for name, pl in self.layers.items():
            indices, bitmaps, levels, implied = encode_columns(pl.csr)
            arrays = {f: getattr(pl.csr, f) for f in _CSR_FIELDS}
            arrays.update(col_indices=indices, col_bitmap=bitmaps)
            for f, arr in arrays.items():
                if arr is not None:
                    tensors[f"csr/{name}/{f}"] = torch.from_numpy(np.ascontiguousarray(arr))
            layers_meta[name] = pl.meta()
            if levels or implied is not None:
                layers_meta[name].update(bitmap_levels=list(levels), implied_level=implied)
                coded = True
        tensors.update({f"dense/{k}": v for k, v in self.dense.items()})
        version = 3 if coded else 2 if (self.depth or self.collapse) else 1
        meta = {"format": FORMAT, "version": version, "spec": self.spec.to_dict(), "model": self.model_name,
                "model_kwargs": self.model_kwargs, "collapse": self.collapse, "depth": self.depth,
                "input_shape": None if self.input_shape is None else list(self.input_shape),
                "layers": layers_meta,
                "ties": self.ties, "sha256": {k: _digest(v) for k, v in tensors.items()}}
        write_tensors(path, tensors, meta)


def _digest(t: torch.Tensor) -> str:
    if t.numel() == 0:  # an empty tensor may have stride 0, which a byte view refuses
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _geometry(mod: nn.Module) -> dict:
    if isinstance(mod, nn.Linear):
        return {}
    return {"stride": tuple(mod.stride), "padding": tuple(mod.padding), "dilation": tuple(mod.dilation),
            "groups": int(mod.groups)}


def _kind(mod: nn.Module) -> str:
    for cls, kind in KINDS.items():
        if isinstance(mod, cls):
            return kind
    raise TypeError(f"cannot pack a {type(mod).__name__}")


def pack(model: nn.Module, dtype: str = "float32", model_name: str | None = None,
         model_kwargs: dict | None = None, collapse: dict | None = None,
         input_shape: tuple[int, ...] | None = None) -> PackedModel:
    """Pack a nested model: every level in one NestedCSR per layer (``dtype`` float32 or int8).
    ``model_name`` / ``model_kwargs`` / ``collapse`` (a layer-sparsity recipe,
    ``CollapseResult.recipe()``) name the architecture, so ``load_packed`` can build it;
    ``input_shape`` (default: the model's ``input_shape``) is one sample's shape, which ``bench``
    and ``export`` feed the model.

    Example::

        packed = pack(model, dtype="int8", model_name="lenet5")
        packed.save("lenet5.nsp")
    """
    if dtype not in ("float32", "int8"):
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: float32, int8")
    spec = get_spec(model)
    if any(isinstance(getattr(mod, "padding_mode", "zeros"), str) and getattr(mod, "padding_mode", "zeros") != "zeros"
           for _, mod, _ in iter_nested(model)):
        raise ValueError("pack supports zero padding only (a layer has padding_mode != 'zeros')")
    layers, owners, ties = {}, {}, {}
    for name, mod, mask in iter_nested(model):
        w = dense_weight(mod).detach().float().cpu()
        csr = from_dense(w.reshape(w.shape[0], -1), mask.level_map.cpu().reshape(w.shape[0], -1), spec.num_levels, dtype)
        layers[name] = PackedLayer(kind=_kind(mod), weight_shape=tuple(w.shape), csr=csr, **_geometry(mod))
        owners[id(mask)] = name
    for name, mod in model.named_modules(remove_duplicate=False):
        for mask in _masks_of(mod):
            if owners.get(id(mask)) not in (None, name):
                ties[name] = owners[id(mask)]
    dense = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".parametrizations.weight." not in k}
    from ..structure.depth import depth_schedule  # noqa: PLC0415

    return PackedModel(spec=spec, layers=layers, dense=dense, ties=ties, model_name=model_name,
                       model_kwargs=dict(model_kwargs or {}), collapse=collapse if collapse and collapse.get("links") else None,
                       depth=depth_schedule(model), input_shape=_shape_or_none(
                           input_shape if input_shape is not None else getattr(model, "input_shape", None)))


#: the largest sample a packed file may name (floats): bench / export allocate batches of it
MAX_SAMPLE = 2**22


def _valid_shape(shape) -> bool:
    return (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 5
            and all(type(v) is int and v >= 1 for v in shape) and math.prod(shape) <= MAX_SAMPLE)


def _shape_or_none(shape) -> tuple[int, ...] | None:
    """The sample shape to record: None when there is none, or when it is beyond what a file may
    name (then ``bench`` / ``export`` need ``input_shape=`` as before)."""
    if shape is None:
        return None
    shape = tuple(int(v) for v in shape)
    return shape if _valid_shape(shape) else None


def _masks_of(mod: nn.Module):
    from torch.nn.utils import parametrize

    from ..nest import NestedMask

    if parametrize.is_parametrized(mod, "weight"):
        yield from (p for p in mod.parametrizations.weight if isinstance(p, NestedMask))


# ------------------------------------------------------------------------------------------- read
def read_packed(path: str | os.PathLike) -> PackedModel:
    """Read and fully check a packed file; raise :class:`PackedFormatError` on any fault."""
    try:
        tensors, meta = read_tensors(path, FORMAT, tuple(range(1, VERSION + 1)))
    except CheckpointError as e:
        raise PackedFormatError(str(e)) from None
    where = Path(path).name
    _check_checksums(tensors, meta, where)
    try:
        spec = LevelSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PackedFormatError(f"{where}: invalid level spec ({e})") from None
    layers_meta = meta.get("layers")
    if not isinstance(layers_meta, dict) or not layers_meta:
        raise PackedFormatError(f"{where}: metadata has no 'layers' table")
    layers = {name: _read_layer(name, lm, tensors, spec, where, meta["version"]) for name, lm in layers_meta.items()}
    known = {f"csr/{n}/{f}" for n in layers for f in _STORED_FIELDS}
    stray = [k for k in tensors if not k.startswith("dense/") and k not in known]
    if stray:
        raise PackedFormatError(f"{where}: unexpected tensors {stray[:3]}")
    ties = meta.get("ties", {})
    if not isinstance(ties, dict) or any(not isinstance(v, str) or v not in layers for v in ties.values()):
        raise PackedFormatError(f"{where}: tie table names layers that are not in the file")
    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or not isinstance(meta.get("model"), (str, type(None))):
        raise PackedFormatError(f"{where}: invalid model name or kwargs")
    recipe = meta.get("collapse")
    if not isinstance(recipe, (dict, type(None))):
        raise PackedFormatError(f"{where}: invalid collapse recipe (expected an object or null)")
    depth = meta.get("depth") or {}
    if not isinstance(depth, dict) or not all(
            isinstance(k, str) and type(v) is int and 1 <= v < spec.num_levels for k, v in depth.items()):
        raise PackedFormatError(f"{where}: invalid layer schedule (expected {{block name: level 1..{spec.num_levels - 1}}})")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and _valid_shape(shape)):
        raise PackedFormatError(f"{where}: invalid input_shape {shape!r} (expected null or 1-5 positive ints, "
                                f"at most {MAX_SAMPLE} values in all)")
    dense = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
    return PackedModel(spec=spec, layers=layers, dense=dense, ties=ties, model_name=meta.get("model"),
                       model_kwargs=kwargs, collapse=recipe or None, depth=depth,
                       input_shape=None if shape is None else tuple(shape))


def _check_checksums(tensors: dict, meta: dict, where: str) -> None:
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise PackedFormatError(f"{where}: checksum table does not list exactly the file's tensors")
    for k, t in tensors.items():
        if _digest(t) != sums[k]:
            layer = k.split("/")[1] if k.startswith("csr/") else k
            raise PackedFormatError(f"{where}: layer {layer!r}: tensor {k!r} fails its SHA-256 check (corrupt file)")


def _ints(v, n: int | None, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or (n is not None and len(v) != n) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in v):
        raise ValueError(f"{what} must be a list of {n or 'some'} non-negative ints, got {v!r}")
    return tuple(v)


def _read_layer(name: str, lm, tensors: dict, spec: LevelSpec, where: str, version: int) -> PackedLayer:
    try:
        if not isinstance(lm, dict) or lm.get("kind") not in KINDS.values():
            raise ValueError(f"kind must be one of {sorted(KINDS.values())}, got {lm.get('kind') if isinstance(lm, dict) else lm!r}")
        nd = {"linear": 2, "conv1d": 3, "conv2d": 4}[lm["kind"]]
        shape = _ints(lm.get("weight_shape"), nd, "weight_shape")
        if min(shape) < 1:
            raise ValueError(f"weight_shape {shape} has a zero dimension")
        geo = {}
        if lm["kind"] != "linear":
            sp = nd - 2
            geo = {"stride": _ints(lm.get("stride"), sp, "stride"), "padding": _ints(lm.get("padding"), sp, "padding"),
                   "dilation": _ints(lm.get("dilation"), sp, "dilation")}
            if min(geo["stride"]) < 1 or min(geo["dilation"]) < 1:
                raise ValueError("stride and dilation must be >= 1")
            groups = lm.get("groups")
            if not isinstance(groups, int) or groups < 1 or shape[0] % groups:
                raise ValueError(f"groups={groups!r} must be a positive int dividing out_channels {shape[0]}")
            geo["groups"] = groups
        dtype = lm.get("dtype")
        arrays = {f: tensors.get(f"csr/{name}/{f}") for f in _STORED_FIELDS}
        if any(arrays[f] is None for f in _CSR_FIELDS[:4]):
            raise ValueError(f"missing arrays {[f for f in _CSR_FIELDS[:4] if arrays[f] is None]}")
        arrays = {f: (None if a is None else a.numpy()) for f, a in arrays.items()}
        levels, implied = lm.get("bitmap_levels", []), lm.get("implied_level")
        if (levels or implied is not None) and version < 3:
            raise ValueError(f"bitmap-coded columns need format version 3, the file says {version}")
        if lm.get("num_levels") != spec.num_levels:
            raise ValueError(f"num_levels {lm.get('num_levels')!r} != the spec's {spec.num_levels}")
        csr = decode_columns(shape=(shape[0], math.prod(shape[1:])), num_levels=lm.get("num_levels"),
                             row_offsets=arrays["row_offsets"], level_counts=arrays["level_counts"],
                             values=arrays["values"], dtype=dtype, scales=arrays["scales"],
                             indices=arrays["col_indices"], bitmaps=arrays["col_bitmap"], levels=levels,
                             implied=implied)
        validate(csr)
    except (NestedCSRError, ValueError, TypeError, KeyError) as e:
        raise PackedFormatError(f"{where}: layer {name!r}: {e}") from None
    return PackedLayer(kind=lm["kind"], weight_shape=shape, csr=csr, **geo)
