"""Structure of the network itself: layer sparsity (collapsing whole layers)."""
from .collapse import (
    CollapseResult,
    Link,
    collapse,
    create_model,
    find_links,
    is_collapsible,
    negative_part_norm,
    prox_layer_sparsity_,
    rebuild,
)

__all__ = ["Link", "CollapseResult", "find_links", "is_collapsible", "negative_part_norm", "prox_layer_sparsity_",
           "collapse", "rebuild", "create_model"]
