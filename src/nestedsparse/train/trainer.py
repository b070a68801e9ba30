"""One trainer for the Python API and the CLI: nested loss, routing, selection, DDP, resume.

Per optimizer step: choose the levels to run (those the selector has ready, the routing phase,
the sampling policy), compute :func:`nested_loss` inside one DDP forward, step, let the
selector update the level maps. Per epoch: evaluate every level, append a JSON line to
``metrics.jsonl``, write an atomic checkpoint. ``resume=True`` continues from the last
checkpoint and, with the same seed, ends where an uninterrupted run would.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is set up here (gloo on CPU, nccl on
CUDA), the batch order is split across ranks, and level maps are broadcast from rank 0 whenever
the selector changes them, so every rank trains the same masks.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..io import atomic_write_bytes
from ..nest import ROUTINGS, evaluating, get_spec, iter_nested, set_routing_, use_level
from ..select import create_selector
from ..structure.collapse import find_links, is_collapsible, prox_layer_sparsity_
from ..structure.depth import depth_schedule
from .checkpoint import FILENAME, load_checkpoint, save_checkpoint
from ..data.hierarchy import resolve_hierarchy
from .loss import SAMPLINGS, Hierarchy, coarse_logits, nested_loss, sample_levels

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "check_train_inputs"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved beside it, so runs can be compared).

    Args:
        epochs, batch_size, lr, optimizer ("sgd" | "adamw"), momentum, weight_decay: as usual;
            weight decay applies to weights only, not to biases or BatchNorm.
        schedule: "cosine" (with ``warmup_epochs``), "step" (x0.1 at 50% and 75%) or "constant".
        routing: "sum" (NestedNet), "mean" (each weight gets the mean of its levels' gradients),
            "own" (each weight learns from the level it first joins) or
            "frozen-core" (joint while maps are chosen, then levels sparsest first, inner
            weights frozen once their level is done).
        sampling: levels per step, "all" or "sandwich" (sparsest, densest, one random).
        level_weights: loss weight per level (default equal).
        distill, temperature: in-place distillation from the densest level (0 = off).
        selector, selector_args: how level maps are chosen (``nestedsparse.select``).
        seed: data order, level sampling and (via the CLI) initialisation.
        max_steps_per_epoch: cap on steps per epoch (quick runs); None = the whole set.
        layer_sparsity: lambda of the layer-sparsity regulariser (Hebiri & Lederer): after each
            optimizer step, a proximal step of ``lr * lambda * ||min(theta_j, 0)||_2`` on every
            collapsible candidate layer (``nestedsparse.structure.find_links``), so whole layers
            become non-negative and merge (``nestedsparse.structure.collapse``); 0 = off.
        input_nonneg: the model's inputs are >= 0 (images in [0, 1]): its first layer can be a
            layer-sparsity candidate too.
        hierarchy, coarse_levels: hierarchical classification (NestedNet): the sparsest
            ``coarse_levels`` levels learn coarse classes, the others the fine ones.
            ``hierarchy`` names a fine -> coarse map (``nestedsparse.data.HIERARCHIES``, e.g.
            "fashion-mnist") or gives it as a list; None = off. Evaluation then also reports
            each level's ``coarse_accuracy``.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    routing: str = "mean"
    sampling: str = "all"
    level_weights: tuple[float, ...] | None = None
    distill: float = 0.0
    temperature: float = 2.0
    selector: str = "magnitude"
    selector_args: Mapping = field(default_factory=dict)
    seed: int = 0
    eval_batch_size: int = 1000
    max_steps_per_epoch: int | None = None
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    layer_sparsity: float = 0.0
    input_nonneg: bool = False
    hierarchy: str | tuple[int, ...] | None = None
    coarse_levels: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "routing": ROUTINGS, "sampling": SAMPLINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is unknown; allowed: {', '.join(allowed)}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got {self.lr}, {self.weight_decay}, {self.momentum}")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise ValueError(f"need 0 <= distill <= 1 and temperature > 0, got {self.distill}, {self.temperature}")
        if not self.layer_sparsity >= 0:
            raise ValueError(f"TrainConfig.layer_sparsity must be >= 0 (0 = off), got {self.layer_sparsity}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}")
        if self.hierarchy is not None:
            if not isinstance(self.hierarchy, str):
                object.__setattr__(self, "hierarchy", tuple(int(v) for v in self.hierarchy))
            resolve_hierarchy(self.hierarchy)  # a clear error now, not at the first step
        if not isinstance(self.coarse_levels, int) or self.coarse_levels < 1:
            raise ValueError(f"TrainConfig.coarse_levels must be an int >= 1, got {self.coarse_levels!r}")
        object.__setattr__(self, "selector_args", dict(self.selector_args))
        if self.level_weights is not None:
            object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["level_weights"] = list(self.level_weights) if self.level_weights else None
        if isinstance(self.hierarchy, tuple):
            d["hierarchy"] = list(self.hierarchy)
        return d

    def hierarchy_spec(self) -> Hierarchy | None:
        """The :class:`~nestedsparse.train.loss.Hierarchy` this config asks for (None = off)."""
        if self.hierarchy is None:
            return None
        return Hierarchy(resolve_hierarchy(self.hierarchy), self.coarse_levels)


@dataclass
class TrainResult:
    """What a run produced: per-epoch history and the final per-level evaluation."""

    history: list[dict]
    final: list[dict]
    run_dir: Path | None


class NestedObjective(nn.Module):
    """Wraps a nested model so the whole multi-level loss is one forward (one DDP reduction)."""

    def __init__(self, model: nn.Module, hierarchy: Hierarchy | None = None) -> None:
        super().__init__()
        self.model = model
        self.hierarchy = hierarchy

    def forward(self, x, y, levels, weights=None, distill=0.0, temperature=1.0):
        return nested_loss(self.model, x, y, levels, weights=weights, distill=distill, temperature=temperature,
                           hierarchy=self.hierarchy)


# ---------------------------------------------------------------------------------------- helpers
def _setup_distributed(device: torch.device) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pick_device(config: TrainConfig) -> torch.device:
    if config.device:
        try:
            dev = torch.device(config.device)
        except RuntimeError as e:
            raise ValueError(f"device {config.device!r} is not a device ({e}); e.g. cpu, cuda, cuda:1") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: this PyTorch has no CUDA device; use cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_train_inputs(model: nn.Module, data: Dataset, config: TrainConfig, device: torch.device) -> None:
    """What :func:`train` refuses about its inputs, as one clear error each: a ``level_weights``
    that does not give one weight per level, labels beyond the model's outputs, a hierarchy that
    does not map exactly those outputs. ``model`` must be on ``device``. The CLI calls it before it
    touches a run folder."""
    n = get_spec(model).num_levels
    if config.level_weights is not None and len(config.level_weights) != n:
        raise ValueError(f"level_weights has {len(config.level_weights)} weights for the {n} levels: give one per "
                         "level")
    _check_labels(model, data, config.hierarchy_spec(), device)


@torch.no_grad()
def _check_labels(model: nn.Module, data: Dataset, hierarchy, device: torch.device) -> None:
    """The model's outputs cover the data's labels, and the hierarchy maps exactly those outputs
    (checked once on a forward of two samples, so a mismatch is a clear error, not an index error
    deep in the loss)."""
    tensors = getattr(data, "tensors", None)
    if not tensors or len(tensors) < 2 or tensors[1].ndim != 1 or len(tensors[0]) < 2:
        return
    with evaluating(model):
        out = model(tensors[0][:2].to(device))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        return
    n_out, top = out.shape[1], int(tensors[1].max())
    if top >= n_out:
        raise ValueError(f"the data's labels go up to {top} but the model has {n_out} outputs: build it with "
                         f"num_classes={top + 1}")
    if hierarchy is not None and hierarchy.mapping.numel() != n_out:
        raise ValueError(f"the hierarchy maps {hierarchy.mapping.numel()} fine classes, the model has {n_out} "
                         "outputs: give one coarse label per class")


def _lr_at(config: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(config.warmup_epochs * steps_per_epoch)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    t = (step - warm) / max(total - warm, 1)
    if config.schedule == "step":
        return config.lr * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if (p.dim() > 1 or name.endswith("original")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def _epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    usable = (n // world) * world
    return perm[:usable][rank::world]


def _batches(data: Dataset, indices: torch.Tensor, batch_size: int, num_workers: int):
    if isinstance(data, TensorDataset):
        for i in range(0, len(indices), batch_size):
            idx = indices[i : i + batch_size]
            yield tuple(t[idx] for t in data.tensors)
    else:
        yield from DataLoader(Subset(data, indices.tolist()), batch_size=batch_size, num_workers=num_workers)


def _broadcast_maps(model: nn.Module) -> None:
    if dist.is_initialized():
        for _, _, m in iter_nested(model):
            dist.broadcast(m.level_map, src=0)


def _broadcast_buffers(model: nn.Module) -> None:
    """Make every rank hold rank 0's buffers (BatchNorm statistics are updated locally per rank)."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


class _Freezer:
    """frozen-core: after each step, put back the entries a finished level owns."""

    def __init__(self, model: nn.Module, level: int) -> None:
        self.saved = []
        nested_ids = set()
        for _, mod, m in iter_nested(model):
            w = mod.parametrizations.weight.original
            nested_ids.add(id(w))
            self.saved.append((w, m.level_map < level, w.detach().clone()))
        if level > 0:  # shared dense parameters belong to the core: freeze them too
            for p in model.parameters():
                if id(p) not in nested_ids:
                    self.saved.append((p, None, p.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for p, where, old in self.saved:
            if where is None:
                p.copy_(old)
            else:
                p.copy_(torch.where(where, old, p))


# ------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, levels=None, batch_size: int = 1000,
             device: torch.device | str | None = None, hierarchy: Hierarchy | None = None) -> list[dict]:
    """Accuracy (fraction) and mean loss of ``model`` on ``data`` at each level (default all).

    With a ``hierarchy`` every row also has ``coarse_accuracy`` (the argmax of
    :func:`~nestedsparse.train.loss.coarse_logits` against the coarse labels) and ``coarse``
    (whether the level was trained on coarse classes); ``loss`` is then the loss the level was
    trained on."""
    spec = get_spec(model)
    device = torch.device(device) if device else next(model.parameters()).device
    levels = range(spec.num_levels) if levels is None else levels
    was_training = model.training
    model.eval()
    out = []
    for k in levels:
        correct, ccorrect, loss, n = 0, 0, 0.0, 0
        coarse = hierarchy is not None and hierarchy.is_coarse(k)
        with use_level(model, k):
            for x, y in _batches(data, torch.arange(len(data)), batch_size, 0):
                x, y = x.to(device), y.to(device)
                logits = model(x)
                correct += int((logits.argmax(-1) == y).sum())
                n += len(y)
                if hierarchy is None:
                    loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                    continue
                cl, yc = coarse_logits(logits, hierarchy.mapping), hierarchy.mapping.to(y.device)[y]
                ccorrect += int((cl.argmax(-1) == yc).sum())
                loss += float(nn.functional.cross_entropy(cl, yc, reduction="sum") if coarse
                              else nn.functional.cross_entropy(logits, y, reduction="sum"))
        row = {"level": k, "accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}
        if hierarchy is not None:
            row.update(coarse_accuracy=ccorrect / max(n, 1), coarse=coarse)
        out.append(row)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    train_data: Dataset,
    test_data: Dataset | None = None,
    config: TrainConfig = TrainConfig(),
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a nested model jointly at all its levels.

    Args:
        model: a nested model (``nestify_``).
        train_data, test_data: datasets of ``(x, y)``; test_data is evaluated at every level
            after each epoch.
        config: a :class:`TrainConfig`.
        run_dir: where ``metrics.jsonl`` and ``checkpoint.safetensors`` go (None = nowhere).
        resume: continue from ``run_dir``'s checkpoint if there is one.
        callback: called after every optimizer step with ``{"epoch", "step", "loss"}``.

    Example::

        result = train(model, train_set, test_set, TrainConfig(epochs=2), run_dir="runs/a")
    """
    spec = get_spec(model)
    device = _pick_device(config)
    rank, world = _setup_distributed(device)
    model.to(device)
    # frozen-core trains jointly ("sum") while the maps are chosen; its phases switch to "own"
    set_routing_(model, "sum" if config.routing == "frozen-core" else config.routing)
    selector = create_selector(config.selector, **config.selector_args)
    optimizer = _optimizer(model, config)
    run_dir = Path(run_dir) if run_dir is not None else None
    n_per_rank = len(train_data) // world
    steps_per_epoch = max(1, math.ceil(n_per_rank / config.batch_size))
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total = steps_per_epoch * config.epochs
    history, start_epoch = [], 0
    if resume and run_dir is not None and (run_dir / FILENAME).is_file():
        meta = load_checkpoint(run_dir, model, optimizer)
        selector.load_state_dict(meta["selector"])
        history, start_epoch = meta["history"], meta["epoch"] + 1
    selector.begin(model, total)
    _broadcast_maps(model)
    links = find_links(model, input_nonneg=config.input_nonneg) if config.layer_sparsity > 0 else []
    if config.layer_sparsity > 0 and not links:
        raise ValueError("TrainConfig.layer_sparsity > 0 but the model has no collapsible candidate "
                         "(Linear -> ReLU -> Linear, or Conv2d -> ReLU -> 1x1 Conv2d, on a non-negative input)")
    hierarchy = config.hierarchy_spec()
    if hierarchy is not None and hierarchy.coarse_levels >= spec.num_levels:
        raise ValueError(f"coarse_levels={hierarchy.coarse_levels} leaves no fine level of the {spec.num_levels}; "
                         f"allowed 1..{spec.num_levels - 1}")
    check_train_inputs(model, train_data, config, device)
    objective = NestedObjective(model, hierarchy)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # layer scheduling: a step that runs only low levels leaves the skipped blocks unused
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids,
                                                        find_unused_parameters=bool(depth_schedule(model)))
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        loss_sum = _train_epoch(model, objective, optimizer, selector, train_data, config, epoch,
                                steps_per_epoch, total, rank, world, device, callback, links)
        row = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "train_loss": loss_sum / steps_per_epoch,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if links:  # layer sparsity: how many candidate layers are all >= 0 (would merge) now
            row["collapsible"] = sum(is_collapsible(model.get_submodule(lk.first)) for lk in links)
            row["candidates"] = len(links)
        _broadcast_buffers(model)
        if test_data is not None:
            row["levels"] = evaluate(model, test_data, batch_size=config.eval_batch_size, device=device,
                                     hierarchy=hierarchy)
        history.append(row)
        if rank == 0 and run_dir is not None:
            _write_epoch(run_dir, model, optimizer, selector, config, row, history, spec)
        if dist.is_initialized():
            dist.barrier()
    final = history[-1].get("levels", []) if history else []
    return TrainResult(history=history, final=final, run_dir=run_dir)


def _write_epoch(run_dir, model, optimizer, selector, config, row, history, spec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": row["epoch"], "history": history, "selector": selector.state_dict(),
             "config": config.to_dict()}
    save_checkpoint(run_dir, model, optimizer, state)
    # rewritten whole from the history the checkpoint holds: never a lost or doubled epoch on resume
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())


def _phase_levels(config, selector, spec, step: int, total: int) -> tuple[list[int], int | None]:
    """(levels trainable now, frozen-core phase level or None)."""
    ready = selector.trainable_levels(spec.num_levels)
    if config.routing != "frozen-core" or not selector.done:
        return ready, None
    sel_end = int(getattr(selector, "end", 0.0) * total)
    span = max(1, math.ceil((total - sel_end) / spec.num_levels))
    phase = min((step - sel_end) // span, spec.num_levels - 1)
    return [phase], phase


def _train_epoch(model, objective, optimizer, selector, data, config, epoch, steps, total, rank, world,
                 device, callback, links=()) -> float:
    from tqdm.auto import tqdm

    spec = get_spec(model)
    model.train()
    indices = _epoch_indices(len(data), config.seed, epoch, rank, world)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress or rank != 0,
               leave=False, dynamic_ncols=True)
    loss_sum, freezer, phase = 0.0, None, None
    for i, (x, y) in enumerate(_batches(data, indices, config.batch_size, config.num_workers)):
        if i >= steps:
            break
        step = epoch * steps + i
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(config, step, total, steps)
        ready, new_phase = _phase_levels(config, selector, spec, step, total)
        if new_phase is not None and new_phase != phase:
            phase, freezer = new_phase, _Freezer(model, new_phase)
            set_routing_(model, "own")
        gen = torch.Generator().manual_seed(config.seed * 7_919 + step)
        levels = sample_levels(ready, config.sampling, gen)
        weights = [config.level_weights[k] for k in levels] if config.level_weights else None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _ = objective(x, y, levels, weights, config.distill, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if links:  # the regulariser's proximal step (identical on every rank: same weights, same lr)
            prox_layer_sparsity_(model, links, optimizer.param_groups[0]["lr"] * config.layer_sparsity)
        if freezer is not None:
            freezer.restore()
        before = selector.done
        selector.step(model)
        if not before:
            _broadcast_maps(model)
        loss_val = loss.item()
        loss_sum += loss_val
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        if callback is not None:
            callback({"epoch": epoch, "step": step, "loss": loss_val})
    bar.close()
    return loss_sum
