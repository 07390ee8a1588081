"""Multi-head attention with RoPE and a growing KV cache: the reference every other architecture is measured against.

Paper: Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, Eq. (1) (scaled dot-product attention)
and Section 3.2.2 (multi-head); rotary positions from Su et al., arXiv 2104.09864, Eq. (34).
Official code: none used (the layout follows Llama: bias-free projections, rotate-half RoPE).
Deviations: none for MHA. The same class serves grouped heads (`n_kv_heads < n_heads`: MQA, GQA) and local
attention (`window`: each query reads its `window` most recent keys, itself included, and the cache keeps at
most `window` tokens, a rolling buffer as in Mistral, arXiv 2310.06825, Section 2).

Cache per layer: k, v (B, H_kv, T, D), T capped at `window` when set.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from reference_impls.base import UNIT_BYTES, repeat_kv
from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache, rope

__all__ = ["Attention", "attention", "bytes_per_token", "cache_bytes", "make"]


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: Optional[int] = None,
              scale: Optional[float] = None) -> Tensor:
    """Causal softmax attention, the explicit way: softmax(q k^T * scale + mask) v, scale 1/sqrt(D) by default.

    q (B, H, q, D), k (B, H_kv, T, D), v (B, H_kv, T, D_v) with H_kv dividing H (group G = H / H_kv reads one
    KV head), q_pos (q,) and k_pos (T,) absolute positions -> (B, H, q, D_v). Key j is visible to query i when
    k_pos[j] <= q_pos[i] and, with a window, q_pos[i] - k_pos[j] < window.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))  # (B, H, q, T)
    dist = q_pos[:, None] - k_pos[None, :]
    visible = dist >= 0 if window is None else (dist >= 0) & (dist < window)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


class Attention(Mixer):
    """RoPE attention with H query heads and H_kv KV heads; `export=True` also returns its (k, v) for CLA/YOCO."""

    def __init__(self, cfg: ArchConfig, n_kv_heads: Optional[int] = None, window: Optional[int] = None,
                 export: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.n_kv_heads = cfg.n_kv_heads if n_kv_heads is None else n_kv_heads
        if self.n_kv_heads < 1 or cfg.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads={cfg.n_heads}, got {self.n_kv_heads}")
        if window is not None and (window < 1 or export):
            raise ValueError(f"window must be >= 1, or None for a layer that exports its keys, got {window}")
        self.window, self.exports = window, export
        H, Hkv, D = cfg.n_heads, self.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, H * D, bias=False)
        self.wk = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.wv = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.d_model, bias=False)

    def heads(self, x: Tensor, n: int) -> Tensor:
        """(B, T, n * D) -> (B, n, T, D)."""
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, cache: Optional[MixerCache] = None, shared=None):
        B, T, _ = x.shape
        start = 0 if cache is None else cache.seen
        pos = torch.arange(start, start + T, device=x.device)
        q = rope(self.heads(self.wq(x), self.n_heads), pos, self.base)     # (B, H, T, D)
        k = rope(self.heads(self.wk(x), self.n_kv_heads), pos, self.base)  # (B, H_kv, T, D)
        v = self.heads(self.wv(x), self.n_kv_heads)
        if cache is not None:  # read the held keys plus the new ones; hold at most `window`
            k, v = cache.append("k", k, self.window), cache.append("v", v, self.window)
            cache.seen += T
        k_pos = torch.arange(start + T - k.shape[2], start + T, device=x.device)
        y = self.wo(attention(q, k, v, pos, k_pos, self.window).transpose(1, 2).reshape(B, T, -1))
        # later layers (CLA, YOCO) read every key so far, at positions 0..len-1: exporters have no window
        return (y, (k, v)) if self.exports else y


def make(cfg: ArchConfig) -> list[Mixer]:
    """The reference: full multi-head attention, one KV head per query head (cfg.n_kv_heads is not read)."""
    return [Attention(cfg, n_kv_heads=cfg.n_heads) for _ in range(cfg.n_layers)]


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES, n_kv_heads: Optional[int] = None) -> int:
    """Keys and values of every layer: n_layers * 2 * H_kv * D * dtype_bytes (H_kv = n_heads unless given)."""
    return cfg.n_layers * 2 * (n_kv_heads or cfg.n_heads) * cfg.head_dim * dtype_bytes


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES, n_kv_heads: Optional[int] = None,
                window: Optional[int] = None) -> int:
    """Bytes held after `seq_len` tokens; a window caps the tokens held per layer."""
    held = seq_len if window is None else min(seq_len, window)
    return held * bytes_per_token(cfg, dtype_bytes, n_kv_heads)
