"""Structure of the network itself: channel scheduling (width), layer scheduling (depth), layer
sparsity (collapsing whole layers), and slimming a level into a smaller dense network."""
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
from .depth import LevelGate, depth_schedule, depth_schedule_, gate_blocks_, is_gated
from .slim import SlimReport, slim, slim_model
from .width import ChannelSelector, channel_counts, channel_level_maps, default_widths, width_sparsity_maps

__all__ = ["Link", "CollapseResult", "find_links", "is_collapsible", "negative_part_norm", "prox_layer_sparsity_",
           "collapse", "rebuild", "create_model", "ChannelSelector", "channel_level_maps", "channel_counts",
           "default_widths", "width_sparsity_maps", "LevelGate", "depth_schedule", "depth_schedule_", "gate_blocks_", "is_gated",
           "slim", "slim_model", "SlimReport"]
