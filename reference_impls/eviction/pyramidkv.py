"""PyramidKV: the same total budget as uniform eviction, spread as a pyramid: most tokens in the lowest layer.

Paper: Zefan Cai et al., "PyramidKV: Dynamic KV Cache Compression based
on Pyramidal Information Funneling", arXiv 2406.02069, Section 3 (budgets decrease arithmetically from the
bottom layer to the top; tokens inside each layer chosen by SnapKV-style window attention).
Official code: https://github.com/Zefan-Cai/KVCache-Factory (`PyramidKVCluster` in `pyramidkv/pyramidkv_utils.py`)
Deviations: (1) a wrapper around any scorer (`PyramidKV(scorer=SnapKV())`), not a copy of SnapKV; only the
scorer's `score()` and its `window` (0 if it has none) are used. (2) The schedule is the official one,
b_l = w + max - l * (max - min) / (L - 1) with min = (b - w) / beta and max = 2 (b - w) - min (clipped to the
prompt), but computed in floating point and rounded by largest remainder, so the layers' budgets add up to
exactly L * b, the uniform total (the official code floors, kvpress rounds per layer: both can miss it by up
to L tokens); like them, it falls back to uniform budgets when the pyramid does not fit. As in the official
code every layer reserves the window on top of its share; kvpress's PyramidKVPress spreads n(1 - r) with no
reservation and falls back to uniform budgets whenever its top layer would keep fewer tokens than the window
(60 tokens, window 8, r = 0.75: kvpress keeps 15 + 15, we keep 22 + 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["PyramidKV", "pyramid_budgets"]


def pyramid_budgets(n: Tensor, budget: Tensor, num_layers: int, window: int = 0, beta: float = 20) -> Tensor:
    """(B, L) integer per-layer budgets, decreasing with depth, each row summing to L * budget[b].

    n (B,) tokens seen, budget (B,) the uniform per-layer budget (<= n), window: tokens every layer keeps on
    top of its pyramid share (the scorer's observation window).
    """
    n, b = n.double(), budget.double()
    share = b - window  # the part of the budget the pyramid redistributes
    lo = share / beta
    hi = 2 * share - lo
    over = hi > n - window  # the bottom layer cannot keep more than the whole prompt
    hi = torch.where(over, n - window, hi)
    lo = torch.where(over, 2 * share - hi, lo)
    l = torch.arange(num_layers, dtype=torch.float64, device=n.device)
    steps = (hi - lo) / max(num_layers - 1, 1)
    exact = window + hi[:, None] - l[None, :] * steps[:, None]  # (B, L), mean = b
    fits = (share > 0) & (lo >= 0) & (hi >= lo)
    exact = torch.where(fits[:, None], exact, b[:, None].expand_as(exact))
    floor = exact.floor()
    missing = (b[:, None] * num_layers - floor.sum(-1, keepdim=True)).round().long()  # (B, 1)
    rank = (floor - exact).argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = largest fractional part
    return floor.long() + (rank < missing).long()


@dataclass
class PyramidKV(EvictionMethod):
    """Per-layer budgets in a pyramid around any scorer; the total over layers equals the uniform total.

    Args:
        ratio: target tokens seen / tokens kept, over all layers; None = the scorer's ratio.
        budget: average absolute tokens kept per layer and head; None = the scorer's budget.
        scorer: the eviction method whose `score()` ranks tokens inside each layer (default SnapKV).
        beta: top-layer budget is (b - window) / beta; larger = steeper pyramid (official default 20).
    """

    ratio: Optional[float] = None
    budget: Optional[int] = None
    scorer: EvictionMethod = field(default_factory=SnapKV)
    beta: float = 20
    name = "pyramidkv"

    def __post_init__(self):
        if not isinstance(self.scorer, EvictionMethod):
            raise ValueError(f"PyramidKV: scorer must be an EvictionMethod, got {type(self.scorer).__name__}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 1):
            raise ValueError(f"PyramidKV: beta must be a number >= 1, got {self.beta!r}")
        if self.ratio is None:
            self.ratio = self.scorer.ratio
        if self.budget is None:
            self.budget = self.scorer.budget
        super().__post_init__()

    @property
    def evict_while_decoding(self) -> bool:  # as the wrapped scorer does
        return self.scorer.evict_while_decoding

    @classmethod
    def from_ratio(cls, ratio: float) -> "PyramidKV":
        return cls(ratio=ratio, scorer=SnapKV(ratio=ratio))

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        return self.scorer.observe(step, history)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return self.scorer.score(step, history, budget)

    def layer_budget(self, n_real: Tensor, layer_idx: int, num_layers: int) -> Tensor:
        uniform = torch.minimum(super().layer_budget(n_real, layer_idx, num_layers), n_real)
        window = getattr(self.scorer, "window", 0)
        return pyramid_budgets(n_real, uniform, num_layers, window, self.beta)[:, layer_idx]
