"""Grouped-query attention: the H query heads form H_kv groups; each group shares one key and one value head.

Paper: Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón, Sanghai, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints", arXiv 2305.13245 (EMNLP 2023), Section 2.2 (grouped-query
attention, Figure 2); Section 2.1's conversion of an MHA checkpoint (mean-pool each group's heads, then
uptrain) lives with the post-training conversions, not here.
Official code: none.
Deviations: trained from scratch here, where the paper uptrains converted T5 checkpoints; RoPE positions.

Cache per layer: k, v (B, H_kv, T, D), G = H / H_kv times smaller than MHA's.
"""

from __future__ import annotations

from reference_impls.base import UNIT_BYTES
from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, Mixer
from reference_impls.architectures.mha import Attention

__all__ = ["Attention", "bytes_per_token", "cache_bytes", "kv_heads", "make"]


def kv_heads(cfg: ArchConfig) -> int:
    """cfg.n_kv_heads when it is a real grouping (1 < H_kv < H); otherwise (the config asks for MHA or MQA) H / 2,
    so that build("gqa", cfg) is GQA with groups of 2 under the one config every architecture shares."""
    if 1 < cfg.n_kv_heads < cfg.n_heads:
        return cfg.n_kv_heads
    if cfg.n_heads % 2 or cfg.n_heads < 4:
        raise ValueError(f"GQA needs 1 < n_kv_heads < n_heads, or an even n_heads >= 4; got n_heads={cfg.n_heads}, "
                         f"n_kv_heads={cfg.n_kv_heads}")
    return cfg.n_heads // 2


def make(cfg: ArchConfig) -> list[Mixer]:
    return [Attention(cfg, n_kv_heads=kv_heads(cfg)) for _ in range(cfg.n_layers)]


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES) -> int:
    """n_layers * 2 * H_kv * D * dtype_bytes."""
    return mha.bytes_per_token(cfg, dtype_bytes, n_kv_heads=kv_heads(cfg))


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES) -> int:
    return seq_len * bytes_per_token(cfg, dtype_bytes)
