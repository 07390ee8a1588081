"""Head-level methods: which attention heads keep the whole cache, and how much each head keeps."""

from reference_impls.heads.razorattention import RazorAttention
from reference_impls.heads.duoattention import DuoAttention
from reference_impls.heads.headkv import HeadKV

__all__ = ["DuoAttention", "HeadKV", "RazorAttention"]
