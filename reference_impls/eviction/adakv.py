"""Ada-KV: one budget per layer, split unevenly across heads by a layer-wide top-k of any scorer's scores.

Paper: Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv 2407.11550, Section 3 (Algorithm 1: adaptive allocation = top-B over the
concatenated scores of all heads of a layer, with a safeguard that keeps a minimum share per head).
Official code: https://github.com/FFY0/AdaKV
Deviations: (1) the safeguard is kvpress's AdaKVPress rule: each head first keeps its top
floor(alpha * b) tokens (alpha = 0.2), then the remaining H_kv * b - (safeguarded) slots go to the best
scores layer-wide. (2) Memory: like the official code's flattened cache, the store
holds sum_h count_h tokens head after head plus one int32 count per head (EvictingStore's varlen layout);
attention runs on a padded view built for the step (the official code calls flash-attn's varlen kernel
instead). kvpress saves nothing (it masks with fake keys). GQA: one budget per KV head; the scorer decides how query heads are aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["AdaKV", "adakv_counts"]


def adakv_counts(scores: Tensor, budget: Tensor, alpha: float = 0.2) -> Tensor:
    """(B, H_kv) tokens each head keeps: its top floor(alpha * b) first, then a top-(H_kv * b) over the layer.

    scores (B, H_kv, T), -inf where nothing may be kept; budget (B,) average tokens per head.
    """
    B, H, T = scores.shape
    n_safe = (alpha * budget.double()).floor().long()  # (B,)
    s = scores.float().clone()
    width = int(n_safe.max())
    if width > 0:  # safeguard: lift each head's best n_safe above every other score (not above -inf holes)
        top = s.topk(width, dim=-1).indices
        lift = (torch.arange(width, device=s.device) < n_safe[:, None, None]) & s.gather(-1, top).isfinite()
        s.scatter_(-1, top, torch.where(lift, torch.finfo(s.dtype).max, s.gather(-1, top)))
    total = H * budget  # (B,) the layer's tokens, as many as uniform allocation
    flat = s.reshape(B, H * T).topk(int(total.max()), dim=-1).indices
    chosen = (torch.arange(flat.shape[1], device=s.device) < total[:, None]) & s.reshape(B, -1).gather(
        -1, flat).isfinite()
    picked = torch.zeros(B, H * T, device=s.device).scatter_(-1, flat, chosen.float())
    return picked.view(B, H, T).sum(-1).long()


@dataclass
class AdaKV(EvictionMethod):
    """Adaptive per-head budgets around any scorer; every layer keeps H_kv * b tokens in total.

    Args:
        ratio: target tokens seen / tokens kept (layer total); None = the scorer's ratio.
        budget: average tokens kept per head; None = the scorer's budget.
        scorer: the eviction method whose `score()` ranks tokens (default SnapKV, i.e. Ada-SnapKV).
        alpha: safeguard, the share of b every head keeps whatever its scores (kvpress default 0.2).
    """

    ratio: Optional[float] = None
    budget: Optional[int] = None
    scorer: EvictionMethod = field(default_factory=SnapKV)
    alpha: float = 0.2
    name = "adakv"

    def __post_init__(self):
        if not isinstance(self.scorer, EvictionMethod):
            raise ValueError(f"AdaKV: scorer must be an EvictionMethod, got {type(self.scorer).__name__}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"AdaKV: alpha must be a number in [0, 1], got {self.alpha!r}")
        self.ratio = self.scorer.ratio if self.ratio is None else self.ratio
        self.budget = self.scorer.budget if self.budget is None else self.budget
        super().__post_init__()

    @property
    def evict_while_decoding(self) -> bool:
        return self.scorer.evict_while_decoding

    @classmethod
    def from_ratio(cls, ratio: float) -> "AdaKV":
        return cls(ratio=ratio, scorer=SnapKV(ratio=ratio))

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        return self.scorer.observe(step, history)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return self.scorer.score(step, history, budget)

    def keep_counts(self, scores: Tensor, row_budget: Tensor) -> Tensor:
        return adakv_counts(scores, row_budget, self.alpha)
