"""H2O: keep the "heavy hitters" (keys that have received the most attention so far) plus a recent window.

Paper: Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen, "H2O: Heavy-Hitter Oracle
for Efficient Generative Inference of Large Language Models", arXiv 2306.14048 (NeurIPS 2023), Section 3
(heavy hitters follow a power law), Algorithm 1 (greedy eviction: score = attention accumulated over all
queries so far, evict the lowest while over budget); the experiments split the budget heavy / recent.
Official code: https://github.com/FMInference/H2O (`h2o_hf/utils_real_drop/modify_llama.py`,
`H2OKVCache_LayerWise`: per-head `hh_score` = attention summed over queries, accumulated step by step).
Deviations: (1) GQA: the official code is for multi-head attention; we store one copy per KV head and
average the accumulated scores of the G query heads of each group (kvpress's ObservedAttentionPress also
averages within the group). (2) The budget is round(n / ratio) tokens per head at the compressing pass (the
benchmark seed, arXiv 2407.01527, sets heavy_ratio = recent_ratio = budget / 2n); it then stays fixed, so
each decoded token evicts one token. (3) The extra state (an fp32 score per kept token, `observe`) is counted in nbytes.
(4) kvpress's ObservedAttentionPress is H2O's score at the prefill only, divided by the number of queries that
saw each key, without a recent window; a recorded kvpress 0.5.5 fixture checks that relation
(tests/eviction/test_kvpress_fixtures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["H2O", "h2o_accumulate", "h2o_scores"]


def h2o_accumulate(acc: Optional[Tensor], probs: Tensor, num_kv_heads: int) -> Tensor:
    """Add this step's attention to the running per-key totals (Alg. 1: a key's score is the attention it
    has received from every query so far).

    acc (B, H_kv, T - q): totals of the keys held before this step, or None on the first step;
    probs (B, H, q, T): this step's attention (a padding query's row is 0: it votes for nothing). Returns (B, H_kv, T).
    """
    B, H, q, T = probs.shape
    # (B, H, T): the official `attn_score_cache.sum(0).sum(1)`, kept per batch row (one query: its row, exactly)
    new = probs[:, :, 0] if q == 1 else probs.sum(dim=2)
    new = new.view(B, num_kv_heads, H // num_kv_heads, T).mean(dim=2)  # GQA: mean over the group (kvpress)
    if acc is not None:  # new keys start at 0: only the held ones add their totals (in place, no padded copy)
        new[..., : acc.shape[2]] += acc
    return new


def h2o_scores(acc: Tensor, positions: Tensor, n_real: Tensor, n_recent: Tensor) -> Tensor:
    """Recent window first (by position), then heavy hitters by accumulated attention.

    acc (B, H_kv, T) accumulated attention; positions (B, H_kv, T) real-token positions, -1 for holes;
    n_real (B,) tokens seen; n_recent (B,) window size. Returns (B, H_kv, T) scores (higher = keep).
    """
    recent = positions >= (n_real - n_recent)[:, None, None]
    top = acc.max() + 1  # every recent token outranks every heavy hitter; accumulated attention is >= 0
    return torch.where(recent, top + positions, acc).masked_fill(positions < 0, float("-inf"))  # top's float dtype


@dataclass
class H2O(EvictionMethod):
    """Heavy hitters + recent window; evicts while decoding too (one token per step once over budget).

    Args:
        ratio: target tokens seen / tokens kept (at the compressing pass; the budget then stays fixed).
        budget: absolute tokens kept per layer and head; overrides ratio.
        heavy_fraction: share of the budget for heavy hitters, the rest is the recent window (0.5 = equal
            halves, as in the benchmark seed and the official code's defaults, heavy_ratio = recent_ratio = 0.1
            of the sequence, i.e. 10% + 10% for a 20% cache).
    """

    heavy_fraction: float = 0.5
    evict_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.heavy_fraction, (int, float)) and 0 <= self.heavy_fraction <= 1):
            raise ValueError(f"H2O: heavy_fraction must be a number in [0, 1], got {self.heavy_fraction!r}")

    def observe(self, step: Step, history: Optional[Tensor]) -> Tensor:
        """The accumulated attention of every held key, this step's queries included (Alg. 1)."""
        # padding queries see nothing in step.mask, so their attention rows are 0: they vote for nothing; holes and
        # padding keys are seen by no query and held at 0 by the store, so their totals stay 0
        return h2o_accumulate(history, step.probs(), step.keys.shape[1])

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        n_recent = budget - (budget.double() * self.heavy_fraction).round().long()  # budget fixed at compression
        return h2o_scores(history, step.positions, step.n_real(), n_recent)
