"""Model registry and the model families (MLP, LeNet-5, CIFAR ResNet, WRN, MobileNetV1).

Every factory takes ``num_classes=10``, ``in_channels`` where it makes sense,
and ``device=None, dtype=None`` that are passed to every layer. Every model has
an ``input_shape`` attribute: the ``(C, H, W)`` (or ``(features,)``) of one
sample it expects, handy for building example inputs.

Example::

    from nestedsparse import models
    net = models.create("resnet20", num_classes=10)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["check_positive_int", "create", "get_factory", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name`` (must be unused)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty str, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_factory(name: str) -> ModelFactory:
    """The factory registered as ``name``; ValueError listing the known names if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}") from None


def _accepted_kwargs(factory: ModelFactory) -> set[str] | None:
    """Keyword names ``factory`` accepts, or None if it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in keyword_kinds}


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` with ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered (the message lists known names).
        TypeError: ``kwargs`` holds names the factory does not take (the message
            names them and lists the accepted ones).
    """
    factory = get_factory(name)
    accepted = _accepted_kwargs(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"model {name!r} got unknown keyword argument(s) {unknown}; "
                f"it accepts: {sorted(accepted)}"
            )
    return factory(**kwargs)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# The families register themselves on import; they need the names above.
from . import lenet, mlp, mobilenet, resnet, wrn  # noqa: E402

__all__ += ["lenet", "mlp", "mobilenet", "resnet", "wrn"]
