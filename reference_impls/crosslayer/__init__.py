"""Cross-layer methods: layers share or merge their KV caches along the depth of the model (`Model.stores`)."""

from reference_impls.crosslayer.kvsharer import KVSharer
from reference_impls.crosslayer.minicache import MiniCache

__all__ = ["KVSharer", "MiniCache"]
