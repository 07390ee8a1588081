"""KNorm: keep the keys with the lowest L2 norm; low-norm keys tend to draw high attention.

Paper: Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv 2406.11430 (EMNLP 2024): the analysis (a key's L2 norm anti-correlates with the attention it
receives) and the rule (keep the tokens with the lowest key norm; no attention scores needed, so it works with
FlashAttention).
Official code: https://github.com/alessiodevoto/l2compress (`cache.py`, `l2_compress`: sort by key norm,
keep the lowest ceil(keep_ratio * n)); kvpress: `KnormPress` (score = -||k||).
Deviations: (1) we compress once, at the compressing pass (the prefill); the official function is applied to the
cache whenever it holds >= `prune_after` tokens (default 2048). (2) The official `skip_layers` option (default
empty) is not offered: every layer is compressed, as with the default and kvpress. (3) The budget is
round(n / ratio) tokens per head (official: ceil(keep_ratio * n)); kept tokens stay in time order (the official
code stores them sorted by norm, which changes nothing after RoPE). Kept indices equal KnormPress's (kvpress
0.5.5, recorded fixture: tests/eviction/test_kvpress_fixtures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["KNorm", "knorm_scores"]


def knorm_scores(k: Tensor) -> Tensor:
    """k (B, H_kv, T, D) -> (B, H_kv, T): minus the key's L2 norm (the lowest norm is kept first)."""
    return -k.float().norm(dim=-1)


@dataclass
class KNorm(EvictionMethod):
    """Lowest key norm kept, per KV head; compresses the prefill only.

    Args:
        ratio: target tokens seen / tokens kept.
        budget: absolute tokens kept per layer and head; overrides ratio.
    """


    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return knorm_scores(step.keys)
