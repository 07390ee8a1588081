"""Token eviction: methods that drop whole tokens' keys and values."""

from reference_impls.eviction.base import EvictingStore, EvictionMethod, keep_top
from reference_impls.eviction.streamingllm import StreamingLLM

__all__ = ["EvictingStore", "EvictionMethod", "StreamingLLM", "keep_top"]
