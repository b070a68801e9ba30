"""Pack: every level in one file (NestedCSR), checked on load, run by sparse CPU kernels."""
from .format import PackedFormatError, PackedModel, pack, read_packed
from .runtime import PackedRuntime, load_packed

__all__ = ["pack", "PackedModel", "PackedFormatError", "read_packed", "load_packed", "PackedRuntime"]
