"""D2O: H2O-style eviction whose evicted tokens merge into their most similar kept token, under layer budgets
set by each layer's attention density.

Paper: Wan, Wu, Zhang, Xin, Tao, Zhu, Wang, Luo, Xiong, Wang, Zhang, "D2O: Dynamic Discriminative Operations for
Efficient Long-Context Inference of Large Language Models", arXiv 2406.13035 (ICLR 2025). Layer level: layers
whose attention is dense (low variance) keep more tokens. Token level (Section 4.2; equation numbers as two
independent ports cite them, the paper body could not be read here): an evicted key k_e is matched to its most
similar kept key, u_e = max_c cos(k_e, k_c) (Eqs. 8-9); it merges only if u_e >= tau, an exponential moving
average of the evicted tokens' u (Eq. 10); a kept token c becomes the softmax-weighted mean of itself
(cos(k_c, k_c) = 1, weight e) and the tokens merged into it (weight exp(u_e)), keys and values alike:
k_c <- (e k_c + sum_e exp(u_e) k_e) / (e + sum_e exp(u_e)) (Eqs. 11-12), a convex combination.
Official code: https://github.com/AIoT-MLSys-Lab/d2o (`LLM_merge_new/LMEval_kv_token_merge/
modeling_llama3_7b_13b_d2o.py` `D2O_LayerKVCache`, `modeling_llama3_new.py` layer allocation).
Deviations: (1) Layer budgets: the official code measures every layer's density during the prefill and
allocates at the first decoding step, b_l = n clamp(L rho softmax(-sigma)_l, 0.01, 1), sigma_l = the variance over
keys of the attention each key received, min-max normalised across heads, averaged over heads. A cache here
compresses each layer at the prefill as its attention ends, before later layers are seen, so the allocation is
causal: b_l = R_l w_l / (w_l + (L - l - 1) mean_{j<=l} w_j), w = exp(-sigma), R_l the tokens left of L b (the
last layer takes the rest): the same weights, the same total, normalised on the layers seen so far. A row whose
uniform budget covers its length keeps everything. (2) The official code leaves layers 0, 1 and L-1
uncompressed (more memory than the budget); here every layer is compressed, so the total matches the ratio.
(3) Merging weights: the paper's Eq. 11-12; the official code averages the kept state with the similarity-scaled
evicted ones (`scatter_reduce(..., src=u k_e, reduce="mean")`), which is not convex. (4) The official code decides
merging once per evicted index from u averaged over heads (each head evicts different tokens); here each head
decides for its own tokens; tau is one per layer and batch row. (5) The compressing pass is the prefill (official:
the first decoding step), so the first tau averages the prefill's evicted tokens. (6) GQA and the budget as in
`eviction.h2o` (H2O's Deviations 1-3); the 4 first tokens (sinks) are always kept, inside the budget.

Presets: heavy_fraction 0.5 (official hh_ratio = recent_ratio), n_sink 4, beta 0.5 (official alpha = belta = 0.5:
tau_t = (1 - beta) tau_{t-1} + beta mean_e u_e), layers "density" (or "uniform" / "pyramid").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Model, Step, repeat_kv
from reference_impls.eviction.base import EvictingStore, evicted
from reference_impls.eviction.h2o import H2O

__all__ = ["D2O", "DensityLayers", "d2o_layer_density", "d2o_match", "d2o_merge", "d2o_threshold"]


def d2o_layer_density(probs: Tensor, valid: Tensor) -> Tensor:
    """(B,) sigma: per query head the (unbiased) variance over real keys of the attention each received, summed
    over queries; min-max normalised across heads; averaged over heads (the official `multimodal_entropy`).
    probs (B, H, q, T), valid (B, H_kv, T). Low = dense attention."""
    col = probs.sum(2)  # (B, H, T)
    real = repeat_kv(valid, probs.shape[1] // valid.shape[1]).float()
    n = real.sum(-1)
    mean = (col * real).sum(-1) / n.clamp(min=1)
    var = ((col - mean[..., None]) ** 2 * real).sum(-1) / (n - 1).clamp(min=1)
    lo, hi = var.min(1, keepdim=True).values, var.max(1, keepdim=True).values
    return ((var - lo) / (hi - lo + 1e-6)).mean(1)


@dataclass(frozen=True)
class DensityLayers:
    """D2O's layer budgets, allocated causally (Deviation 1); one per cache, filled as its layers compress."""

    density: dict = field(default_factory=dict, compare=False, repr=False)  # layer -> (B,) sigma
    kept: dict = field(default_factory=dict, compare=False, repr=False)  # layer -> (B,) tokens it keeps

    def layer_budget(self, n: Tensor, budget: Tensor, layer_idx: int, num_layers: int, window: int) -> Tensor:
        if layer_idx == 0:
            self.kept.clear()  # a new compressing pass
        w = torch.stack([torch.exp(-self.density[j]) for j in range(layer_idx + 1)])  # (l + 1, B)
        left = num_layers - layer_idx - 1  # layers not seen yet, each assumed of the mean weight so far
        remaining = num_layers * budget - sum(self.kept.values(), torch.zeros_like(budget))
        b = (remaining * w[-1] / (w[-1] + left * w.mean(0))).round().long().clamp(min=1)
        b = torch.where(budget >= n, budget, b)  # a cache that fits needs no allocation
        self.kept[layer_idx] = torch.minimum(b, n)  # what a layer cannot use goes to the later ones
        return b


def d2o_threshold(tau: Optional[Tensor], u: Tensor, out: Tensor, beta: float) -> Tensor:
    """(B,) Eq. 10: tau starts at the mean of the evicted tokens' u, then tau <- (1 - beta) tau + beta mean u.
    NaN until a row first evicts (nothing merges). u, out (B, H_kv, T)."""
    cnt = out.sum((1, 2))
    mean = torch.where(out, u, 0.0).sum((1, 2)) / cnt.clamp(min=1)
    mean = torch.where(cnt > 0, mean, torch.nan)
    if tau is None:
        return mean
    return torch.where(cnt == 0, tau, torch.where(tau.isnan(), mean, (1 - beta) * tau + beta * mean))


def d2o_match(keys: Tensor, kept_k: Tensor, hole: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs. 8-9: each token's cosine similarity u to its most similar kept key, and that key's slot.
    keys (B, H_kv, T, D), kept_k (B, H_kv, W, D), hole (B, H_kv, W) -> u, nearest (B, H_kv, T)."""
    sim = F.normalize(keys.float(), dim=-1) @ F.normalize(kept_k.float(), dim=-1).transpose(-1, -2)
    return sim.masked_fill(hole[:, :, None, :], -math.inf).max(-1)


def d2o_merge(keys: Tensor, values: Tensor, kept_k: Tensor, kept_v: Tensor, u: Tensor, nearest: Tensor,
              merged: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs. 11-12: each kept token becomes the weighted mean of itself (weight e = exp(cos(k_c, k_c))) and of the
    `merged` tokens matched to it (weight exp(u_e)), keys and values alike.
    keys, values (B, H_kv, T, D); kept_k, kept_v (B, H_kv, W, D); u, nearest, merged (B, H_kv, T)."""
    weight = torch.exp(u).masked_fill(~merged, 0.0)
    M = torch.zeros(*kept_k.shape[:3], keys.shape[2], device=keys.device)  # (B, H_kv, W, T): M[c, e] = exp(u_e)
    M.scatter_(2, nearest[:, :, None, :], weight[:, :, None, :])
    denom = math.e + M.sum(-1, keepdim=True)
    k = (math.e * kept_k.float() + M @ keys.float()) / denom
    v = (math.e * kept_v.float() + M @ values.float()) / denom
    return k.to(kept_k.dtype), v.to(kept_v.dtype)


@dataclass
class D2O(H2O):
    """H2O + sinks, with similarity-gated merging of evicted tokens and density-based layer budgets.

    Args (ratio, budget, heads, heavy_fraction: see H2O):
        layers: "density" (D2O's layer budgets, default), or "uniform" / "pyramid" (see EvictionMethod).
        n_sink: initial tokens always kept.
        beta: weight of the newest evicted tokens in the EMA threshold (Eq. 10), in (0, 1].
    """

    layers: Any = "density"
    n_sink: int = 4
    beta: float = 0.5

    def __post_init__(self):
        density = isinstance(self.layers, DensityLayers) or (isinstance(self.layers, str) and self.layers == "density")
        if density:
            self.layers = "uniform"  # the base validates a known policy; DensityLayers replaces it below
        super().__post_init__()
        if density:
            self.layers = DensityLayers()
        if not (isinstance(self.n_sink, int) and self.n_sink >= 0):
            raise ValueError(f"D2O: n_sink must be an int >= 0, got {self.n_sink!r}")
        if not (isinstance(self.beta, (int, float)) and 0 < self.beta <= 1):
            raise ValueError(f"D2O: beta must be a number in (0, 1], got {self.beta!r}")

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        # a cache makes its stores in order, layer 0 first: its layers share one copy of the method, which holds
        # what they share (the densities the allocation reads, the thresholds)
        if layer_idx == 0 or getattr(self, "_cache", None) is None:
            cache = copy.copy(self)
            cache._cache, cache._tau = None, {}
            if isinstance(self.layers, DensityLayers):
                cache.layers = DensityLayers()
            self._cache = cache
        return EvictingStore(self._cache, layer_idx, model)

    def observe(self, step: Step, history: Optional[Tensor]) -> Tensor:
        if step.compress and isinstance(self.layers, DensityLayers):  # the layer's density, read by its budget
            self.layers.density[step.layer_idx] = d2o_layer_density(step.probs(), step.valid)
        return super().observe(step, history)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        s = super().score(step, history, budget)  # recent window, then heavy hitters
        sink = (step.positions >= 0) & (step.positions < self.n_sink)
        return torch.where(sink, s.max() + 1, s)

    def merge(self, step, history, idx, hole, k, v):
        out = evicted(step, idx, hole)
        if not bool(out.any()):
            return k, v
        u, nearest = d2o_match(step.keys, k, hole)
        tau = self._tau[step.layer_idx] = d2o_threshold(self._tau.get(step.layer_idx), u, out, self.beta)
        return d2o_merge(step.keys, step.values, k, v, u, nearest, out & (u >= tau[:, None, None]))
