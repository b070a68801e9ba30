"""Consensus of levels (NestedNet): several levels of one nested network vote on each input.

NestedNet's two consensus rules over the levels' outputs:

* **A** (``mode="average"``): the mean of the levels' softmax probabilities (returned as its log,
  so ``argmax`` and ``cross_entropy`` work on it as on logits);
* **L** (``mode="linear"``): a learned linear layer over the concatenated levels' logits, fitted
  with the nested network frozen (:func:`fit_consensus`); it starts as the plain mean of the
  logits.

The levels share their weights, so the ensemble costs no extra storage, only the extra forwards.
Works on a nested model (levels set with ``use_level``) or on a packed runtime
(``rt(x, level=k)``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..nest import get_spec, is_nested, use_level

__all__ = ["LevelConsensus", "fit_consensus", "consensus_accuracy", "CONSENSUS_MODES"]

CONSENSUS_MODES = ("average", "linear")


class LevelConsensus(nn.Module):
    """The consensus of ``levels`` (default all) of ``model``.

    Args:
        model: a nested model, or a packed runtime (anything called as ``model(x, level=k)``).
        levels: the levels that vote (at least two).
        mode: "average" (NestedNet's A) or "linear" (L).
        num_classes: outputs per level; needed by ``mode="linear"``.

    ``forward(x)`` returns ``[N, num_classes]`` scores: log-probabilities (average) or logits
    (linear). ``model`` is a submodule (``.to()`` / ``.eval()`` reach it, ``state_dict()`` holds
    it); :func:`fit_consensus` trains only :attr:`head`.
    """

    def __init__(self, model: nn.Module, levels: Sequence[int] | None = None, mode: str = "average",
                 num_classes: int | None = None) -> None:
        super().__init__()
        if mode not in CONSENSUS_MODES:
            raise ValueError(f"consensus mode {mode!r} is unknown; allowed: {', '.join(CONSENSUS_MODES)}")
        spec = get_spec(model) if is_nested(model) else getattr(model, "spec", None)
        if spec is None:
            raise ValueError("LevelConsensus needs a nested model (nestify_) or a packed runtime")
        levels = list(range(spec.num_levels)) if levels is None else [int(k) for k in levels]
        for k in levels:
            spec.check_level(k)
        if len(set(levels)) < 2:
            raise ValueError(f"a consensus needs at least two distinct levels, got {levels}")
        self.model, self.levels, self.mode = model, levels, mode
        self.head: nn.Linear | None = None
        if mode == "linear":
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"mode='linear' needs num_classes (a positive int), got {num_classes!r}")
            L = len(levels)
            self.head = nn.Linear(L * num_classes, num_classes)
            with torch.no_grad():  # start as the mean of the levels' logits
                self.head.weight.copy_(torch.eye(num_classes).repeat(1, L) / L)
                self.head.bias.zero_()

    def level_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each voting level's output on ``x`` (logits), in ``levels`` order."""
        if is_nested(self.model):
            outs = []
            for k in self.levels:
                with use_level(self.model, k):
                    outs.append(self.model(x))
            return outs
        return [self.model(x, level=k) for k in self.levels]

    def combine(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The consensus of the levels' outputs ``outs`` (from :meth:`level_outputs`)."""
        if self.mode == "average":
            logp = torch.stack([F.log_softmax(o, dim=-1) for o in outs])
            return torch.logsumexp(logp, dim=0) - math.log(len(outs))
        return self.head(torch.cat(list(outs), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.level_outputs(x))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"


def _batches(data: Dataset, batch_size: int, shuffle: bool, seed: int = 0):
    from .trainer import _batches as batches  # noqa: PLC0415 - the trainer's loader (TensorDataset fast path)

    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    return batches(data, order, batch_size, 0)


def _device(cons: LevelConsensus) -> torch.device:
    p = next(iter(cons.model.parameters()), None) if isinstance(cons.model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def fit_consensus(cons: LevelConsensus, data: Dataset, epochs: int = 1, lr: float = 1e-2, batch_size: int = 256,
                  seed: int = 0) -> list[float]:
    """Fit the linear consensus head (mode "linear") on ``data`` with the nested model frozen (its
    levels run in eval mode, no gradients). Returns the mean loss of each epoch."""
    if cons.head is None:
        raise ValueError("only a mode='linear' consensus has parameters to fit")
    bad = [f"{k} {v}" for k, v, ok in (("epochs", epochs, epochs >= 1), ("lr", lr, lr > 0),
                                        ("batch_size", batch_size, batch_size >= 1)) if not ok]
    if bad:
        raise ValueError(f"fit_consensus needs epochs >= 1, lr > 0 and batch_size >= 1; got {', '.join(bad)}")
    dev = _device(cons)
    cons.head.to(dev)
    was = cons.model.training if isinstance(cons.model, nn.Module) else False
    if isinstance(cons.model, nn.Module):
        cons.model.eval()
    opt = torch.optim.Adam(cons.head.parameters(), lr=lr)
    history = []
    try:
        for ep in range(epochs):
            total, n = 0.0, 0
            for x, y in _batches(data, batch_size, shuffle=True, seed=seed + ep):
                x, y = x.to(dev), y.to(dev)
                with torch.no_grad():
                    outs = cons.level_outputs(x)
                loss = F.cross_entropy(cons.combine(outs), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()) * len(y), n + len(y)
            history.append(total / max(n, 1))
    finally:
        if isinstance(cons.model, nn.Module):
            cons.model.train(was)
    return history


@torch.no_grad()
def consensus_accuracy(cons: LevelConsensus, data: Dataset, batch_size: int = 1000) -> dict:
    """Accuracy of the consensus on ``data``, and of each voting level alone (same forwards):
    ``{"accuracy": ..., "levels": {level: accuracy}}``."""
    dev = _device(cons)
    was = cons.model.training if isinstance(cons.model, nn.Module) else False
    if isinstance(cons.model, nn.Module):
        cons.model.eval()
    correct, per, n = 0, [0] * len(cons.levels), 0
    try:
        for x, y in _batches(data, batch_size, shuffle=False):
            x, y = x.to(dev), y.to(dev)
            outs = cons.level_outputs(x)
            correct += int((cons.combine(outs).argmax(-1) == y).sum())
            for i, o in enumerate(outs):
                per[i] += int((o.argmax(-1) == y).sum())
            n += len(y)
    finally:
        if isinstance(cons.model, nn.Module):
            cons.model.train(was)
    return {"accuracy": correct / max(n, 1), "levels": {k: c / max(n, 1) for k, c in zip(cons.levels, per)}}
