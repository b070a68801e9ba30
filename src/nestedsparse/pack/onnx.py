"""Export one level of a packed model to ONNX (a plain dense model), checked against the runtime.

``dense_model_for_level(rt, k)`` turns a :class:`~nestedsparse.pack.runtime.PackedRuntime` into
the ordinary dense PyTorch model of level ``k``: every packed layer becomes a plain
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` holding the level's dense weight (zeros where the
level is inactive) and every per-level BatchNorm an inference BatchNorm holding that level's
fused per-channel scale / shift (``running_mean = 0``, ``running_var = 1``, ``eps = 0``, so it
computes exactly ``x * scale + shift``; ONNX Runtime folds it into the preceding Conv). The
rest of the model (activations, pooling, the forward code) is the registry model itself.

``export_level(path, k, output)`` exports that model with the TorchScript exporter
(``dynamo=False``; a dynamic batch axis), runs the ONNX file with ONNX Runtime on a random
input and returns ``max |onnxruntime - runtime(x, level=k)|``; it raises ``ValueError`` when
that exceeds ``1e-4`` relative to the output's scale.

Example::

    err = export_level("lenet5.nsp", level=0, output="lenet5_l0.onnx")
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ChannelAffine", "dense_model_for_level", "export_level", "example_input", "ort_session", "TOLERANCE"]

#: Largest allowed ``max|ORT - runtime| / max(1, max|runtime|)``.
TOLERANCE = 1e-4


class ChannelAffine(nn.modules.batchnorm._BatchNorm):
    """Inference BatchNorm computing ``x * scale[c] + shift[c]`` over channel dim 1 (any rank >= 2).

    Stored as a BatchNorm (``running_mean = 0``, ``running_var = 1``, ``eps = 0``): PyTorch runs
    its fused inference kernel and the ONNX export is one ``BatchNormalization`` node.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        n = scale.numel()
        super().__init__(n, eps=0.0, momentum=None, affine=True, track_running_stats=True)
        with torch.no_grad():
            self.weight.copy_(scale.detach().reshape(-1).float())
            self.bias.copy_(shift.detach().reshape(-1).float())
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.eval()

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"ChannelAffine expects a [N, C, ...] input, got {input.dim()}D")


def _plain_layer(mod: nn.Module, level: int) -> nn.Module:
    """A plain dense nn.Linear / nn.Conv{1,2}d equal to packed layer ``mod`` at ``level``."""
    pl = mod.pl
    w = mod.dense_weight(level, keep=False).detach().float().clone()  # clone: the kept copy may be an inference tensor
    b = None if mod.bias is None else mod.bias.detach().float().clone()
    if pl.kind == "linear":
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        cls = nn.Conv1d if pl.kind == "conv1d" else nn.Conv2d
        kernel = tuple(pl.weight_shape[2:])
        new = cls(pl.weight_shape[1] * pl.groups, pl.weight_shape[0], kernel, stride=tuple(pl.stride),
                  padding=tuple(pl.padding), dilation=tuple(pl.dilation), groups=pl.groups, bias=b is not None)
    with torch.no_grad():
        new.weight = nn.Parameter(w.reshape(new.weight.shape), requires_grad=False)
        if b is not None:
            new.bias = nn.Parameter(b, requires_grad=False)
    return new


def dense_model_for_level(rt, level: int) -> nn.Module:
    """The plain dense PyTorch model of ``level`` of packed runtime ``rt`` (eval mode, no grads).

    Every packed layer becomes ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with the level's dense
    weight (``layer.dense_weight(level)``) and bias; every per-level BatchNorm a
    :class:`ChannelAffine` with the level's scale / shift; a block the level skips (layer
    scheduling) an ``nn.Identity``. ``rt`` is left untouched and shares no
    packed arrays with the result. Layers that share one packed weight (ties) share one dense weight.
    """
    from ..structure.depth import is_gated
    from .runtime import LevelBatchNorm, _OpenGate, _SparseBase

    rt.spec.check_level(level)
    memo: dict[int, nn.Module] = {}
    for mod in rt.model.modules():
        if id(mod) in memo:
            continue
        if isinstance(mod, _SparseBase):
            memo[id(mod)] = _plain_layer(mod, level)
        elif isinstance(mod, LevelBatchNorm):
            memo[id(mod)] = ChannelAffine(mod.scale[level], mod.shift[level])
        elif is_gated(mod):  # layer scheduling: the level's network has only the blocks it runs
            if mod.level_gate.min_level > level:
                memo[id(mod)] = nn.Identity()
            else:
                memo[id(mod.level_gate)] = _OpenGate()
    # Tied packed layers are separate modules over one NestedCSR: give them one dense Parameter.
    by_csr: dict[int, nn.Module] = {}
    for mod in rt.model.modules():
        if isinstance(mod, _SparseBase):
            first = by_csr.setdefault(id(mod.csr), memo[id(mod)])
            if first is not memo[id(mod)] and first.weight.shape == memo[id(mod)].weight.shape:
                memo[id(mod)].weight = first.weight
    # deepcopy with the replacements pre-seeded in the memo: the packed modules (and their
    # arrays) are never copied, everything else (the forward code, activations, pools) is.
    dense = copy.deepcopy(rt.model, memo)
    if hasattr(rt.model, "input_shape"):  # a GraphModule's (collapsed model's) deep copy drops it
        dense.input_shape = rt.model.input_shape
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense


def _input_shape(rt, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    shape = getattr(rt.model, "input_shape", None)
    if shape is not None:
        return tuple(int(v) for v in shape)
    first = rt.sparse_layers()[0] if rt.sparse_layers() else None
    if first is not None and first.pl.kind == "linear":
        return (int(first.pl.weight_shape[1]),)
    raise ValueError("cannot infer the model's input shape (no `input_shape` attribute); pass input_shape=(C, H, W)")


def example_input(rt, batch: int, input_shape: Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
    """A random float32 input ``[batch, *input_shape]`` for runtime ``rt`` (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *_input_shape(rt, input_shape)), generator=g)


def _export(model: nn.Module, x: torch.Tensor, output) -> None:
    """``torch.onnx.export`` (TorchScript exporter) with a dynamic batch axis; ``output`` a path
    or a binary file object."""
    output = output if hasattr(output, "write") else str(output)
    kw = dict(input_names=["input"], output_names=["output"], opset_version=17, do_constant_folding=True,
              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(model, (x,), output, dynamo=False, **kw)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(model, (x,), output, **kw)


def ort_session(path: str | os.PathLike | bytes, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session on a file or an in-memory model (all graph optimisations,
    ``threads`` intra-op threads, sequential; ``spinning=False``: idle workers block instead of
    spinning)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def export_level(packed_path: str | os.PathLike, level: int, output: str | os.PathLike,
                 model_factory: Callable[[], nn.Module] | None = None,
                 input_shape: Sequence[int] | None = None, batch: int = 2, slim: bool = False) -> float:
    """Export ``level`` of a packed file as a dense ONNX model and check it with ONNX Runtime.

    Args:
        packed_path: a file written by ``PackedModel.save``.
        level: the level to export.
        output: the ``.onnx`` file to write (dynamic batch axis; input ``input``, output ``output``).
        model_factory: builds the architecture (default: the registry model the file names).
        input_shape: one sample's shape (default: the model's ``input_shape`` attribute).
        batch: batch size of the random check input.
        slim: export the level without the channels only zero weights read
            (:func:`nestedsparse.structure.slim`): a channel-scheduled level becomes its thin
            dense network, smaller and faster in any engine.

    Returns:
        ``max |onnxruntime(x) - runtime(x, level)|`` on a random input.

    Raises:
        ValueError: the level does not exist, or the difference exceeds :data:`TOLERANCE` relative
            to ``max(1, max |runtime(x)|)``.
        ImportError: onnxruntime (needed for the check) is not installed.
    """
    from .runtime import load_packed

    rt = load_packed(packed_path, model_factory)
    rt.spec.check_level(level)
    dense = dense_model_for_level(rt, level)
    x = example_input(rt, batch, input_shape)
    if slim:
        from ..structure.slim import slim as slim_fn

        dense = slim_fn(dense, x)
    _export(dense, x, output)
    try:
        sess = ort_session(output)
    except ImportError as e:
        raise ImportError("export_level checks the exported file with onnxruntime; install it "
                          "(pip install nestedsparse[onnx])") from e
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    ref = rt(x, level=level)
    if got.shape != ref.shape:
        raise ValueError(f"ONNX output shape {tuple(got.shape)} != runtime output shape {tuple(ref.shape)}")
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
    if not err <= TOLERANCE * scale:  # also catches NaN
        raise ValueError(f"level {level}: max |onnxruntime - runtime| = {err:.3e} exceeds {TOLERANCE:g} x {scale:.3g}")
    return err
