"""Coarse class groups for hierarchical classification (fine label -> coarse label)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "FASHION_MNIST_COARSE_CLASSES",
    "FASHION_MNIST_HIERARCHY",
    "FASHION_MNIST_HIERARCHY_GROUPS",
    "HIERARCHIES",
    "coarse_labels",
    "mapping_from_groups",
    "resolve_hierarchy",
    "mapping_from_dataset",
]

#: Coarse group name -> fine Fashion-MNIST labels in that group.
FASHION_MNIST_HIERARCHY_GROUPS: Mapping[str, tuple[int, ...]] = {
    "tops": (0, 2, 6),  # T-shirt/top, Pullover, Shirt
    "bottoms": (1,),  # Trouser
    "dresses": (3,),  # Dress
    "outers": (4,),  # Coat
    "accessories": (8,),  # Bag
    "shoes": (5, 7, 9),  # Sandal, Sneaker, Ankle boot
}

#: Coarse class names; index ``i`` is coarse label ``i``.
FASHION_MNIST_COARSE_CLASSES: tuple[str, ...] = tuple(FASHION_MNIST_HIERARCHY_GROUPS)


def mapping_from_groups(groups: Mapping[str, Sequence[int]], num_fine: int) -> torch.Tensor:
    """Build a fine->coarse int64 map of length ``num_fine`` from named groups.

    The i-th group (in mapping order) becomes coarse label ``i``. Every fine
    label in ``0..num_fine-1`` must belong to exactly one group.
    """
    mapping = torch.full((num_fine,), -1, dtype=torch.int64)
    for coarse, (group, members) in enumerate(groups.items()):
        for fine in members:
            if not 0 <= fine < num_fine:
                raise ValueError(
                    f"group {group!r} lists fine label {fine}, allowed range is 0..{num_fine - 1}"
                )
            if mapping[fine] >= 0:
                raise ValueError(
                    f"fine label {fine} is in more than one group (again in {group!r})"
                )
            mapping[fine] = coarse
    missing = (mapping < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"fine labels {missing} belong to no group")
    return mapping


#: Fine Fashion-MNIST label -> coarse label, int64 tensor of length 10.
FASHION_MNIST_HIERARCHY: torch.Tensor = mapping_from_groups(FASHION_MNIST_HIERARCHY_GROUPS, 10)


def coarse_labels(fine: torch.Tensor, mapping: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Map fine labels to coarse labels with a fine->coarse lookup table.

    Args:
        fine: integer tensor of fine labels, any shape, any device.
        mapping: 1-D table; ``mapping[f]`` is the coarse label of fine label ``f``.

    Returns:
        int64 tensor shaped like ``fine`` on ``fine``'s device.
    """
    table = torch.as_tensor(mapping, dtype=torch.int64, device=fine.device)
    if table.ndim != 1:
        raise ValueError(f"mapping must be 1-D, got shape {tuple(table.shape)}")
    if fine.dtype.is_floating_point or fine.dtype.is_complex or fine.dtype == torch.bool:
        raise TypeError(f"fine labels must be an integer tensor, got dtype {fine.dtype}")
    if fine.numel():
        low, high = int(fine.min()), int(fine.max())
        if low < 0 or high >= table.numel():
            raise ValueError(
                f"fine labels span {low}..{high}, mapping covers 0..{table.numel() - 1}"
            )
    return table[fine.long()]


#: Named fine -> coarse maps (``TrainConfig(hierarchy=...)``, ``train --hierarchy``).
HIERARCHIES: Mapping[str, torch.Tensor] = {"fashion-mnist": FASHION_MNIST_HIERARCHY}


def resolve_hierarchy(spec: str | Sequence[int], num_fine: int | None = None) -> torch.Tensor:
    """A fine -> coarse map from a name in :data:`HIERARCHIES` or an explicit list (``mapping[f]``
    = coarse label of fine label ``f``; coarse labels 0..C-1, each used). ``num_fine``: the
    model's number of classes, checked against the map's length."""
    if isinstance(spec, str):
        if spec == "data":
            raise ValueError("hierarchy 'data' is read from the training set's coarse labels: use it with "
                             "`nestedsparse train`, or pass nestedsparse.data.mapping_from_dataset(train_set)")
        if spec not in HIERARCHIES:
            raise ValueError(f"hierarchy {spec!r} is unknown; named ones: {', '.join(HIERARCHIES)} "
                             "(or give the fine -> coarse map as a list of ints)")
        table = HIERARCHIES[spec].clone()
    else:
        try:
            table = torch.as_tensor([int(v) for v in spec], dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a hierarchy map is a list of coarse labels, one per fine label; got {spec!r:.80}") from e
        if table.numel() == 0 or int(table.min()) < 0:
            raise ValueError(f"a hierarchy map needs one coarse label >= 0 per fine label; got {spec!r:.80}")
        used = torch.unique(table)
        if used.numel() != int(table.max()) + 1:
            raise ValueError(f"coarse labels must be 0..C-1, each used; the map uses {used.tolist()}")
    if num_fine is not None and table.numel() != num_fine:
        raise ValueError(f"the hierarchy maps {table.numel()} fine labels but the model has {num_fine} classes")
    return table


def mapping_from_dataset(data) -> tuple[int, ...]:
    """The fine -> coarse map a dataset's own ``coarse_targets`` define (CIFAR-100's 20
    superclasses, Fashion-MNIST's 6 groups); ``ValueError`` when it has none or a fine label
    appears under two coarse labels."""
    coarse = getattr(data, "coarse_targets", None)
    fine = data.tensors[1] if hasattr(data, "tensors") else None
    if coarse is None or fine is None:
        raise ValueError(f"{getattr(data, 'name', type(data).__name__)} has no coarse labels; give the hierarchy "
                         "by name or as a list of coarse labels, one per class")
    n = int(fine.max()) + 1
    table = torch.full((n,), -1, dtype=torch.int64)
    table[fine.long()] = coarse.long()
    if not torch.equal(table[fine.long()], coarse.long()):
        raise ValueError("the dataset's coarse labels are not a function of its fine labels")
    if bool((table < 0).any()):
        raise ValueError(f"fine labels {(table < 0).nonzero().flatten().tolist()} never appear in the dataset")
    return tuple(int(v) for v in table)
