"""Multi-query attention: every query head reads one shared key head and one shared value head.

Paper: Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", arXiv 1911.02150, Section 3
(multi-query attention) and Section 3.1 (its incremental form, the decoding loop this cache serves).
Official code: none (the paper gives its own TensorFlow snippets).
Deviations: RoPE positions and bias-free Llama-style projections (the paper predates RoPE); otherwise it is
`mha.Attention` with n_kv_heads = 1.

Cache per layer: k, v (B, 1, T, D): n_heads times smaller than MHA's.
"""

from __future__ import annotations

from reference_impls.base import UNIT_BYTES
from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, Mixer
from reference_impls.architectures.mha import Attention

__all__ = ["Attention", "bytes_per_token", "cache_bytes", "make"]


def make(cfg: ArchConfig) -> list[Mixer]:
    """The paper's configuration: one KV head per layer, whatever cfg.n_kv_heads says."""
    return [Attention(cfg, n_kv_heads=1) for _ in range(cfg.n_layers)]


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES) -> int:
    """n_layers * 2 * D * dtype_bytes: one key and one value vector per token and layer."""
    return mha.bytes_per_token(cfg, dtype_bytes, n_kv_heads=1)


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES) -> int:
    return seq_len * bytes_per_token(cfg, dtype_bytes)
