"""Choosing the level maps: a registry of selectors shaped like ``torch.optim`` schedulers.

A selector owns *how* level maps are chosen (magnitude, NestedNet's learned thresholds) and
*when* (a gradual schedule during training, then fixed). The trainer calls ``begin`` once with
the number of optimizer steps, then ``step`` after every optimizer step; ``state_dict`` /
``load_state_dict`` make a resumed run continue the same schedule.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["Selector", "register_selector", "create_selector", "list_selectors"]

_REGISTRY: dict[str, Callable[..., "Selector"]] = {}


class Selector:
    """Base class: a policy that writes level maps into a nested model over training."""

    name = "base"

    def __init__(self) -> None:
        self.step_count = 0
        self.total_steps = 0

    def begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once before training with the planned number of optimizer steps."""
        self.total_steps = int(total_steps)

    def step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""
        self.step_count += 1

    def trainable_levels(self, num_levels: int) -> list[int]:
        """Levels whose maps are ready to be trained now (all by default)."""
        return list(range(num_levels))

    @property
    def done(self) -> bool:
        """True once the maps are final."""
        return self.step_count >= self.total_steps

    def state_dict(self) -> dict:
        """JSON-ready state for checkpoints."""
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])


def register_selector(name: str) -> Callable:
    """Class decorator adding a selector to the registry under ``name``."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def create_selector(name: str, **kwargs) -> Selector:
    """Build the selector registered as ``name`` (unknown names list the known ones)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_selectors() -> list[str]:
    """Names of the registered selectors."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from . import magnitude, nestednet  # noqa: F401  (registers them)
    from ..structure import width  # noqa: F401  (channel scheduling: "channels")
