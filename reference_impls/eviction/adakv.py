"""Ada-KV: one budget per layer, split unevenly across heads by a layer-wide top-k of the scorer's scores.

Paper: Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv 2407.11550, Section 3 (Algorithm 1: adaptive allocation = top-B over the
concatenated scores of all heads of a layer, with a safeguard that keeps a minimum share per head).
Official code: https://github.com/FFY0/AdaKV (`adaptive_snapkv`: `floor_alpha`, the window kept per head)

Ada-KV is SnapKV with the `Adaptive` head policy (`policies.py` holds the allocation); any scorer takes it
(`KNorm(heads="adaptive")`, and with `layers="pyramid"` both policies at once). Deviations: (1) the default
allocation is the official code's: every head keeps the window and floor(alpha (b - w)) prefix tokens, then
the layer's remaining slots go to the best scores layer-wide; `Adaptive(rule="kvpress")` is kvpress's
AdaKVPress rule (floor(alpha b) per head, window included, so below ~5 windows of budget no prefix token is
protected), which the recorded kvpress fixtures check. (2) Memory: like the official code's flattened cache,
the store holds sum_h count_h tokens head after head plus one int32 count per head (EvictingStore's varlen
layout); attention runs on a padded view built for the step (the official code calls flash-attn's varlen
kernel instead). kvpress saves nothing (it masks with fake keys). GQA: one budget per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reference_impls.eviction.policies import Adaptive
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["AdaKV"]


@dataclass
class AdaKV(SnapKV):
    """SnapKV scores with adaptive per-head counts (`heads=Adaptive(alpha=0.2)`); every layer keeps H_kv * b tokens
    in total. Takes SnapKV's knobs and presets."""

    heads: Any = field(default_factory=Adaptive)
