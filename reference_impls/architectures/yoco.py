"""You Only Cache Once: a self-decoder with constant caches below, a cross-decoder reading ONE global KV cache above.

Paper: Sun, Dong, Zhu, Huang, Wang, Ma, Zhang, Wang, Wei, "You Only Cache Once: Decoder-Decoder Architectures
for Language Models", arXiv 2405.05254 (NeurIPS 2024), Section 2 (the lower L/2 layers are the self-decoder,
here its sliding-window variant YOCO_SWA; the global K^, V^ are projected once from the self-decoder's output
X^(L/2) and every upper layer cross-attends to them with its own queries, causally masked).
Official code: https://github.com/microsoft/unilm/tree/master/YOCO (yoco/models/decoder/yoco.py).
Deviations: (1) K^, V^ are projected by the first cross-decoder layer from its pre-norm input X^(L/2), which
also serves that layer's queries (the official code gives K^, V^ their own RMSNorm of the same X^(L/2));
(2) the self-decoder's heads and window are cfg's (the paper sizes them separately; gated retention, its
other self-decoder, belongs with the recurrent modules).

Cache: L/2 sliding-window caches of at most `window` tokens each (constant), plus one global k, v
(B, H_kv, T, D) held by the first cross-decoder layer and read by the others through `shared`.
"""

from __future__ import annotations

from reference_impls.base import UNIT_BYTES
from reference_impls.architectures.cla import SharedKVAttention
from reference_impls.architectures.common import ArchConfig, Mixer
from reference_impls.architectures.mha import Attention

__all__ = ["bytes_per_token", "cache_bytes", "make", "self_decoder_bytes"]


def make(cfg: ArchConfig) -> list[Mixer]:
    """n_layers // 2 sliding-window layers, one layer producing the global KV (and attending to it), then readers."""
    if cfg.n_layers < 2:
        raise ValueError(f"n_layers must be >= 2 (a self-decoder and a cross-decoder), got {cfg.n_layers}")
    half = cfg.n_layers // 2
    return ([Attention(cfg, window=cfg.window) for _ in range(half)] + [Attention(cfg, export=True)]
            + [SharedKVAttention(cfg) for _ in range(cfg.n_layers - half - 1)])


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES) -> int:
    """What grows with the sequence: the one global cache, 2 * H_kv * D * dtype_bytes, whatever n_layers."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def self_decoder_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES) -> int:
    """The self-decoder's sliding-window caches: constant once seq_len >= window."""
    return (cfg.n_layers // 2) * min(seq_len, cfg.window) * bytes_per_token(cfg, dtype_bytes)


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES) -> int:
    return self_decoder_bytes(cfg, seq_len, dtype_bytes) + seq_len * bytes_per_token(cfg, dtype_bytes)
