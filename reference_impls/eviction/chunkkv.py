"""ChunkKV: keep or drop whole chunks of consecutive tokens, ranked by a base scorer's scores gathered per chunk.

Paper: Xiang Liu, Zhenheng Tang, Peijie Dong, Zeyu Li, Yue Liu, Bo Li, Xuming Hu, Xiaowen Chu, "ChunkKV:
Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", arXiv 2502.00299 (NeurIPS
2025), Algorithm 1: the observation window's attention to every key, summed over each chunk of c
consecutive tokens (S_c = sum_{i in c} sum_{j in W} A_{j,i}), the top chunks kept whole beside the window; and
layer-wise index reuse (one selection shared by a group of adjacent layers).
Official code: https://github.com/NVIDIA/kvpress (`ChunkKVPress`, `kvpress/presses/chunkkv_press.py`, contributed
by the first author): a wrapper around any scorer press, as `base` is here.

Deviations:
(1) Budget: exactly b tokens per head, the window included: whole chunks in rank order, the last one cut to what
    fits (its earliest tokens first). Algorithm 1 takes floor(L_max / c) chunks and truncates them to L_max - w;
    kvpress keeps int(C (1 - r)) whole chunks, so its count is a multiple of c, not the budget.
(2) Chunks tile the prefix: the base scorer's protected window (`base.window`, SnapKV's observation window) is
    kept apart and first, as Algorithm 1 concatenates it; kvpress chunks the whole sequence, window included
    (whose maximal scores make the chunks holding it win). Chunk c holds positions [c k, (c + 1) k), so a
    left-padded row is chunked as if it were alone.
(3) Aggregation: reduce="mean" averages a chunk's scores (kvpress), "sum" sums them (the paper's S_c); they differ
    only for a chunk cut short (the one before the window). Scores are summed over the KV heads so every head of
    a layer keeps the same chunks, as kvpress does (`shared_heads=False`: each head ranks its own chunks).
(4) Layer-wise index reuse is not implemented: each layer selects its own chunks. The paper reuses them to save
    selection time (its 26.5% throughput gain), not memory; kvatlas's stores select layer by layer.
(5) `score` returns ranks, not attention: window first (most recent first), then chunk by chunk. So
    `heads="adaptive"` splits a layer's tokens by rank, not by attention.
Presets: chunk_size 10 (the paper's recommended chunk size; kvpress defaults to 20); base SnapKV() (window 64,
kernel 5, avg pooling: kvpress's evaluation wraps its SnapKVPress defaults). ChunkKV compresses the compressing
pass only (Algorithm 1 compresses the prefill), whatever its base does while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["ChunkKV", "chunk_scores"]


def chunk_scores(scores: Tensor, positions: Tensor, chunk_size: int, *, reduce: str = "mean",
                 shared_heads: bool = True) -> Tensor:
    """Each key's chunk score: every key of chunk c = position // chunk_size gets the chunk's aggregate.

    scores (B, H_kv, T) base scores; positions (B, H_kv, T), -1 for keys outside every chunk (window, padding,
    holes). reduce "sum" or "mean" over the chunk's held keys; shared_heads: summed over the KV heads first (one
    ranking per layer). Returns (B, H_kv, T) float64, -inf outside chunks.
    """
    B, H, T = scores.shape
    chunked = positions >= 0
    ids = torch.where(chunked, positions // chunk_size, 0)
    C = int(ids.max()) + 1
    s = torch.where(chunked, scores.double(), 0.0)
    total = s.new_zeros(B, H, C).scatter_add_(2, ids, s)  # (B, H_kv, C)
    count = s.new_zeros(B, H, C).scatter_add_(2, ids, chunked.double())
    if shared_heads:  # kvpress: `global_scores.sum(dim=1)`, one chunk ranking for all heads of the layer
        total, count = total.sum(1, keepdim=True).expand(B, H, C), count.sum(1, keepdim=True).expand(B, H, C)
    agg = total / count.clamp(min=1) if reduce == "mean" else total
    return agg.gather(2, ids).masked_fill(~chunked, float("-inf"))


@dataclass
class ChunkKV(EvictionMethod):
    """Whole chunks of `chunk_size` tokens ranked by `base`'s scores, beside `base`'s protected window.

    Args (ratio, budget, layers, heads: see EvictionMethod; the budget includes the window):
        base: the scorer whose scores are gathered per chunk (an EvictionMethod, or a method id such as "knorm");
            its own ratio and budget are ignored. Default SnapKV().
        chunk_size: tokens per chunk (>= 1). reduce: "mean" (kvpress) or "sum" (the paper's S_c).
        shared_heads: one chunk ranking per layer, scores summed over the KV heads (kvpress); False: per head.
    """

    base: Any = field(default_factory=SnapKV)
    chunk_size: int = 10
    reduce: str = "mean"
    shared_heads: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.base, str):  # the CLI's `chunkkv:base=knorm`
            from reference_impls.methods import make_method

            self.base = make_method(self.base)
        if not isinstance(self.base, EvictionMethod):
            raise ValueError(f"ChunkKV: base must be an eviction method, got {type(self.base).__name__}")
        if not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ValueError(f"ChunkKV: chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"ChunkKV: reduce must be 'mean' or 'sum', got {self.reduce!r}")
        if not isinstance(self.shared_heads, bool):
            raise ValueError(f"ChunkKV: shared_heads must be a bool, got {self.shared_heads!r}")

    @property
    def window(self) -> int:
        return self.base.window

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        return self.base.observe(step, history)  # a base with a running statistic (H2O) keeps it

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        base = self.base.score(step, history, budget)
        pos = step.positions
        in_window = step.valid & (pos >= (step.n_real() - self.window)[:, None, None])
        agg = chunk_scores(base, pos.masked_fill(in_window | ~step.valid, -1), self.chunk_size, reduce=self.reduce,
                           shared_heads=self.shared_heads)
        # held keys are in time order, so a stable sort ranks the chunks by score (earlier chunk on ties) and
        # the tokens of a chunk by position: the top b - w ranks are whole chunks, the last one cut short
        rank = agg.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        ranked = torch.where(torch.isfinite(agg), -rank.to(torch.float32), float("-inf"))
        T = pos.shape[-1]
        return torch.where(in_window, (T + 1 + pos).to(torch.float32), ranked)  # the window first, newest first
