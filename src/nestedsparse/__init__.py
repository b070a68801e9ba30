"""nestedsparse: one network, several nested sparsity levels, switched at run time.

Levels 0..L-1 (0 = sparsest) share one weight tensor per layer; every level's non-zero weights
are a subset of the next level's. Train them jointly, save one file, run any level.
"""
from .io import CheckpointError, load, load_into_, save
from .levels import LevelSpec
from .metrics import count_macs, count_params, level_summary
from .nest import (
    NestedBatchNorm,
    NestedMask,
    NestReport,
    get_levels,
    get_spec,
    iter_nested,
    nestify_,
    plain_model,
    set_level_,
    set_routing_,
    use_level,
)
from .select import create_selector, list_selectors
from .structure import collapse, find_links, prox_layer_sparsity_
from .train import LevelConsensus, TrainConfig, TrainResult, evaluate, fit_consensus, nested_loss, train

__version__ = "0.1.0"

__all__ = [
    # levels and nesting
    "LevelSpec", "nestify_", "NestReport", "NestedMask", "NestedBatchNorm", "get_spec", "iter_nested",
    # switching level
    "set_level_", "use_level", "get_levels", "set_routing_", "plain_model",
    # selection and training
    "create_selector", "list_selectors", "nested_loss", "TrainConfig", "TrainResult", "train", "evaluate",
    # consensus of levels
    "LevelConsensus", "fit_consensus",
    # layer sparsity (whole layers collapse)
    "find_links", "prox_layer_sparsity_", "collapse",
    # files
    "save", "load", "load_into_", "CheckpointError",
    # metrics
    "count_params", "count_macs", "level_summary",
]
