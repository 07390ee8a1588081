"""Token merging: the evicted tokens' keys and values are folded into the kept ones instead of being dropped.

Each method is an `EvictionMethod` (its `score` chooses the kept tokens, so budget policies, replay and composition
with a quantizer apply) that also writes `merge`, which `EvictingStore.evict` calls right after the kept tokens are
gathered (see `reference_impls/eviction/base.py`).
"""

from reference_impls.merging.cam import CaM
from reference_impls.merging.d2o import D2O
from reference_impls.merging.kvmerger import KVMerger

__all__ = ["CaM", "D2O", "KVMerger"]
