"""Cross-Layer Attention: only every `share`-th layer computes keys and values; the layers above it reuse them.

Paper: Brandon, Mishra, Nrusimha, Panda, Ragan-Kelley, "Reducing Transformer Key-Value Cache Size with
Cross-Layer Attention", arXiv 2405.12981 (NeurIPS 2024), Section 2: a KV-producing layer, then layers that
project only queries and reuse its keys and values; CLA2 shares across pairs of adjacent layers, and the cache
shrinks by the sharing factor (slightly less when it does not divide the number of layers: ceil below).
Official code: none.
Deviations: none known; the KV heads are cfg.n_kv_heads (the paper's best points are MQA-CLA2 and GQA-CLA2;
with the default config this is MHA-CLA2, which isolates the sharing across layers).

Cache: a producing layer holds k, v (B, H_kv, T, D); a reusing layer holds nothing and reads the producer's
cache through `shared`, so each shared cache is held once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from reference_impls.base import UNIT_BYTES
from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache, rope
from reference_impls.architectures.mha import Attention, attention

__all__ = ["Attention", "SharedKVAttention", "bytes_per_token", "cache_bytes", "make"]


class SharedKVAttention(Mixer):
    """Queries and output projection only; keys and values come from a lower layer as `shared` = (k, v).

    shared k, v (B, H_kv, T_all, D) hold every token so far (positions 0..T_all-1); the T new queries are the last.
    """

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cache: Optional[MixerCache] = None, shared=None) -> Tensor:
        if shared is None:
            raise ValueError("shared must be the (k, v) of a lower layer: put a KV-producing layer below this one")
        k, v = shared
        B, T, _ = x.shape
        k_pos = torch.arange(k.shape[2], device=x.device)
        pos = k_pos[-T:]
        q = rope(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), pos, self.base)  # (B, H, T, D)
        if cache is not None:
            cache.seen += T  # nothing held: the producer's cache is the only copy
        return self.wo(attention(q, k, v, pos, k_pos).transpose(1, 2).reshape(B, T, -1))


def make(cfg: ArchConfig, share: int = 2) -> list[Mixer]:
    """Layers 0, share, 2 share, ... produce keys and values; each layer above reuses the latest (CLA2: share=2)."""
    if not 1 <= share <= cfg.n_layers:
        raise ValueError(f"share must be in [1, n_layers={cfg.n_layers}], got {share}")
    return [Attention(cfg, export=True) if i % share == 0 else SharedKVAttention(cfg) for i in range(cfg.n_layers)]


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES, share: int = 2) -> int:
    """ceil(n_layers / share) producing layers, each 2 * H_kv * D * dtype_bytes."""
    return math.ceil(cfg.n_layers / share) * 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES, share: int = 2) -> int:
    return seq_len * bytes_per_token(cfg, dtype_bytes, share)
