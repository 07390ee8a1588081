"""CriticalKV: half the budget by the base method's attention score, the rest by attention times ||v W_o||_1.

Paper: Feng, Lv, Guo, Cao, Zhou, Xie, "CriticalKV: Optimizing KV Cache Eviction from an Output Perturbation
Perspective" (v1: "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"),
arXiv 2502.03805, Section 3: the L1 perturbation of the projected attention output after eviction is bounded by
a sum over the evicted entries of A_i ||v_i W_o||_1, where attention alone ignores the value and projection;
its two-stage selection (Algorithm 1) keeps S1 = top(A, alpha b), then S2 = top over i not in S1 of
A_i ||v_i W_o^h||_1 for the remaining (1 - alpha) b, here alpha = `first_stage_ratio`.
Official code: https://github.com/FFY0/AdaKV-in-NVIDIA-kvpress/tree/criticalkv (the authors' port to kvpress),
now NVIDIA kvpress `kvpress/presses/criticalkv_press.py` (`CriticalKVPress`, `CriticalAdaKVPress`).
Presets: kvpress's (first_stage_ratio=0.5, epsilon=1e-4, base SnapKV with kvpress's SnapKVPress settings).
Deviations: (1) A_i is the base method's score (SnapKV's pooled window votes by default), as in kvpress; any
kvatlas eviction scorer can be the base; its own ratio/budget/policy knobs are ignored (this method's apply).
Like kvpress, the base score must be >= 0 (attention-like): (A + epsilon) ||v W_o|| reverses negative scores.
(2) GQA: the G query heads of a KV head each have their own W_o slice; their L1 norms are averaged (kvpress).
(3) With `heads="adaptive"` (CriticalAdaKV) each head's count is decided from the base scores (the Ada-KV split
of `policies.py`; kvpress's rule with rule="kvpress"), then both stages run within it, as CriticalAdaKVPress
does; `heads="threshold"` is not supported. (4) The base's protected window (SnapKV's observation window, which
it scores highest) always goes to stage 1, also when alpha b is smaller than it (kvpress then lets the rest of the
window compete in stage 2). (5) Needs the output projection, `Model.weights(layer_idx)["o"]` (hidden, H * D), as
nn.Linear stores it; a ValueError says so when the model gives none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.eviction.policies import Threshold
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["CriticalKV", "criticalkv_scores", "projected_value_norm"]

_LIFT = torch.finfo(torch.float32).max  # a kept entry's score: above every other, and equal, so a re-count agrees


def projected_value_norm(v: Tensor, w_o: Tensor, num_heads: int) -> Tensor:
    """||v W_o^h||_1 averaged over each GQA group: v (B, H_kv, T, D), w_o (hidden, H * D) -> (B, H_kv, T)."""
    B, H_kv, T, D = v.shape
    G = num_heads // H_kv
    w = w_o.float().t().reshape(H_kv, G, D, -1)  # (H_kv, G, D, hidden): query head h reads columns h*D .. h*D + D
    norms = torch.stack([(v.float() @ w[:, g]).abs().sum(-1) for g in range(G)])  # (G, B, H_kv, T), one head at a time
    return norms.mean(0)


def criticalkv_scores(base: Tensor, vnorm: Tensor, counts: Tensor, *, first_stage_ratio: float, epsilon: float,
                      min_first: int = 0) -> Tensor:
    """Two-stage selection: (B, H_kv, T) scores whose top counts[b, h] per head are the entries kept.

    base, vnorm (B, H_kv, T) (base -inf where nothing may be kept); counts (B, H_kv) entries per head. Stage 1
    keeps each head's top int(alpha counts) base scores (at least min_first: the base's protected window, which it
    scores highest), stage 2 fills the rest by (base + epsilon) * vnorm; both end up at _LIFT, above the rest.
    """
    real = base.isfinite()
    first = (first_stage_ratio * counts.double()).long()  # int(), as kvpress
    rank1 = base.argsort(dim=-1, descending=True, stable=True).argsort(-1)  # 0 = best base score
    first = torch.maximum(first, counts.clamp(max=min_first))
    keep = (rank1 < first[..., None]) & real
    stage2 = torch.where(real, (base + epsilon) * vnorm, float("-inf"))  # Algorithm 1, stage 2: A_i ||v_i W_o||_1
    rank2 = stage2.masked_fill(keep, float("inf")).argsort(dim=-1, descending=True, stable=True).argsort(-1)
    keep = keep | ((rank2 < counts[..., None]) & real)  # stage 1 first, then the best stage-2 scores up to counts
    return torch.where(keep, _LIFT, stage2.clamp(max=_LIFT / 2))


@dataclass
class CriticalKV(EvictionMethod):
    """A base scorer's selection corrected for what each kept entry adds to the output; prefill like its base.

    Args (ratio, budget, layers, heads: see EvictionMethod; heads "uniform" = CriticalKV, "adaptive" = CriticalAdaKV):
        base: the eviction method whose score is the attention A (an instance or a method id; default SnapKV()).
            Its score must be >= 0 (attention-like); its own ratio/budget/layers/heads are ignored.
        first_stage_ratio: alpha, the share of each head's budget taken by the base score alone, in [0, 1].
        epsilon: added to the base score before the value-norm weighting (>= 0).
    """

    base: Any = field(default_factory=SnapKV)
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.base, str):  # a method id, as the command line gives it (e.g. base=expected-attention)
            from reference_impls.methods import method_class

            self.base = method_class(self.base)()
        if not isinstance(self.base, EvictionMethod) or isinstance(self.base, CriticalKV):
            raise ValueError(f"CriticalKV: base must be an eviction method (not CriticalKV), got {self.base!r}")
        if isinstance(self.heads, Threshold):
            raise ValueError("CriticalKV: heads must be uniform or adaptive (threshold counts follow no budget)")
        if not (isinstance(self.first_stage_ratio, (int, float)) and 0 <= self.first_stage_ratio <= 1):
            raise ValueError(f"CriticalKV: first_stage_ratio must be a number in [0, 1], "
                             f"got {self.first_stage_ratio!r}")
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0):
            raise ValueError(f"CriticalKV: epsilon must be a number >= 0, got {self.epsilon!r}")

    @property
    def window(self) -> int:
        return self.base.window

    @property
    def evict_while_decoding(self) -> bool:
        return self.base.evict_while_decoding

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        bound = replace(self, base=self.base.new_layer(layer_idx, model).method)  # the base bound to the model too
        bound._model = model  # W_o is read when scoring, so weights given after the cache is made count
        return EvictingStore(bound, layer_idx, model)

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        return self.base.observe(step, history)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        weights = getattr(getattr(self, "_model", None), "weights", None)
        if weights is None:
            raise ValueError("CriticalKV needs the output projection W_o, but Model.weights is None: build the cache "
                             "on a model whose attention weights kvatlas can read, or set cache.model_info.weights")
        w_o = weights(step.layer_idx)["o"].to(step.values.device)
        base = self.base.score(step, history, budget).float().masked_fill(~step.valid, float("-inf"))
        # each head's count comes from the base score (CriticalAdaKV: Ada-KV's split before the value norms); the
        # kept set is then lifted to _LIFT, so the store's own count over these scores finds the same numbers
        counts = torch.minimum(self.heads.head_counts(base, budget, self.window), step.valid.sum(-1))
        vnorm = projected_value_norm(step.values, w_o, step.queries.shape[1])
        return criticalkv_scores(base, vnorm, counts, first_stage_ratio=self.first_stage_ratio, epsilon=self.epsilon,
                                 min_first=self.window)
