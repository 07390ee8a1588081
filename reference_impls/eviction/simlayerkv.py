"""SimLayerKV: a layer whose newest token attends almost only to the first and the most recent tokens is "lazy";
lazy layers keep just those (StreamingLLM's sinks + window), the other layers keep their whole cache.

Paper: Xuan Zhang, Cunxiao Du, Chao Du, Tianyu Pang, Wei Gao, Min Lin, "SimLayerKV: A Simple Framework for
Layer-Level KV Cache Reduction", arXiv 2410.13846, the method: a layer is lazy when the attention of the last
token(s) on the initial tokens I and the recent window R, averaged over heads, exceeds a threshold delta; a
lazy layer's cache is reduced to I and R, the others are left whole (decided once per input).
Official code: https://github.com/sail-sg/SimLayerKV (`LongBench/SimLayerKV_llama.py`,
`SimLayerKV_attention_llama.py`: "SimLayerKV-decode", |I| = 4, |R| = 1024, delta per model family in `pred.py`:
Llama-3 0.9, Llama-2 0.65, Mistral 0.8, Qwen 0.85).

Deviations:
(1) When: the decision uses the last `n_last` queries of the compressing pass (the last prompt token by default,
    as kvpress's SimLayerKVPress `n_last=1`); the official decode variant uses the first generated token (its
    prefill variant, commented out there, the last 32 tokens). Both trim once and then append new tokens.
(2) Window: the budget b sets what a lazy layer keeps, the first n_initial tokens + the last b - n_initial
    (b = round(n / ratio); the paper's 4 + 1024 is `budget=1028`), and the laziness is measured on the same
    sets (the official code measures on the first 4 and last 1024 keys, counting twice those in both when the
    prompt is shorter than 1028; here I and R are a union). So the achieved ratio follows the number of lazy
    layers: L n / (lazy b + (L - lazy) n), below the target unless every layer is lazy.
(3) Per row: a padded batch decides per row (the official code and kvpress average over the batch).
(4) GQA: the query heads' attention is averaged over all heads, as the official code does; a lazy layer trims
    every KV head.
(5) Heads: the default `Threshold` head policy is what lets a non-lazy layer keep more than b tokens. Under a
    budgeted head policy (heads="uniform" or "adaptive") every layer keeps its budget, so every layer is
    treated as lazy (StreamingLLM's sinks + recent window, compressed once): SimLayerKV's scorer under that
    policy, as every eviction scorer takes every policy here.
Differences from kvpress's SimLayerKVPress: kvpress keeps n_recent - n_last recent tokens (room for the next
one), defaults to delta = 1.0 (never lazy) and averages over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Step, repeat_kv
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.eviction.policies import Threshold

__all__ = ["SimLayerKV", "lazy_keep", "laziness"]


def lazy_keep(positions: Tensor, n: Tensor, budget: Tensor, n_initial: int) -> Tensor:
    """(B, H_kv, T) bool: the first min(n_initial, b) positions and the last b - that of each row (b = budget).

    positions (B, H_kv, T), -1 for padding and holes; n (B,) tokens seen; budget (B,) tokens a lazy layer keeps.
    """
    first = budget.clamp(max=n_initial)
    recent = budget - first
    pos = positions
    return (pos >= 0) & ((pos < first[:, None, None]) | (pos >= (n - recent)[:, None, None]))


def laziness(probs: Tensor, q_real: Tensor, keep: Tensor) -> Tensor:
    """(B,) attention mass that the last queries put on the `keep` keys, averaged over heads and real queries.

    probs (B, H, m, T) attention of the last m queries; q_real (B, m) bool; keep (B, H_kv, T) bool.
    """
    mass = (probs * repeat_kv(keep, probs.shape[1] // keep.shape[1])[:, :, None, :]).sum(-1)  # (B, H, m)
    mass = mass.mean(1)  # official: `.mean(dim=1)` over heads
    w = q_real.to(mass.dtype)
    return (mass * w).sum(-1) / w.sum(-1).clamp(min=1)


class _SimLayerStore(EvictingStore):
    """An EvictingStore whose layer, when nothing is dropped (not lazy, or within budget), stays the full cache."""

    def evict(self, step: Step):
        had_index = self.slots is not None
        dropped = super().evict(step)
        if dropped is not None and not had_index and not bool(dropped[1].any()) \
                and dropped[0].shape[-1] == step.keys.shape[2]:  # every token kept, in order: no index to hold
            self.slots = None
            return None
        return dropped


@dataclass
class SimLayerKV(EvictionMethod):
    """Lazy layers keep n_initial + (b - n_initial) recent tokens, the others everything; decided at the
    compressing pass from the attention of its last `n_last` queries.

    Args (ratio, budget, layers: see EvictionMethod; b = what a lazy layer keeps):
        threshold: delta, lazy when the attention mass on the kept sets exceeds it (default 0.9, the official
            value for Llama-3; 0.65 Llama-2, 0.8 Mistral, 0.85 Qwen). 1.0: never lazy.
        n_initial: initial tokens a lazy layer keeps (official 4). n_last: queries that measure laziness (1).
        heads: Threshold (default): SimLayerKV. "uniform"/"adaptive": every layer keeps its budget, as if lazy.
    """

    threshold: float = 0.9
    n_initial: int = 4
    n_last: int = 1
    heads: Any = field(default_factory=lambda: Threshold(min_score=0.5))

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= 1):
            raise ValueError(f"SimLayerKV: threshold must be a number in [0, 1], got {self.threshold!r}")
        for knob, low in (("n_initial", 0), ("n_last", 1)):
            if not (isinstance(getattr(self, knob), int) and getattr(self, knob) >= low):
                raise ValueError(f"SimLayerKV: {knob} must be an int >= {low}, got {getattr(self, knob)!r}")

    def lazy(self, step: Step, budget: Tensor) -> tuple[Tensor, Tensor]:
        """(lazy (B,) bool, keep (B, H_kv, T) bool): each row's decision and what a lazy layer keeps."""
        keep = lazy_keep(step.positions, step.n_real(), budget, self.n_initial)
        obs = step.last(self.n_last)
        return laziness(obs.probs(), obs.q_real, keep) > self.threshold, keep

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        if not isinstance(self.heads, Threshold):  # a budgeted head policy: every layer keeps b, as a lazy one
            return lazy_keep(step.positions, step.n_real(), budget, self.n_initial).float()
        lazy, keep = self.lazy(step, budget)
        # 1 = keep, 0 = drop; the Threshold head policy keeps every key scored >= 0.5
        return torch.where(lazy[:, None, None], keep, step.valid).float()

    def new_layer(self, layer_idx, model) -> EvictingStore:
        return _SimLayerStore(self, layer_idx, model)
