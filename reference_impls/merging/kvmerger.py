"""KVMerger: runs of consecutive, similar keys collapse into one state each, a Gaussian-kernel mean around the run's
most attended token.

Paper: Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context
Tasks", arXiv 2407.08454. Observation: within a head, adjacent keys are highly similar. Merging sets (Algorithm 1,
an agglomerative clustering constrained to consecutive tokens): scanning the sequence, a token joins its
neighbour's set while their keys' cosine similarity is above a threshold. Each set S merges into its pivot p, the
member with the highest aggregated attention, with Gaussian-kernel weights g_i = exp(-|k_i - k_p|^2 / 2 sigma^2),
w_i = g_i / sum_{j in S} g_j: k_p <- sum_i w_i k_i and v_p <- sum_i w_i v_i (keys and values alike; w_p = 1 / sum g).
Official code: none published.
How it meets a budget: the sets a threshold gives are nested (a lower threshold only joins sets), so each token
has the similarity s*_i at which it stops being its set's pivot (its set joins one whose pivot has more
attention). Scoring -s*_i and keeping the top b per head keeps exactly the pivots of the threshold that yields b
sets; the sets are then recovered from the kept pivots (between two consecutive pivots, the boundary is the least
similar adjacent pair). `heads="threshold"` with Threshold(min_score=-tau) gives the paper's fixed threshold tau.
Deviations: (1) the paper fixes one threshold (its merging ratio per layer and head follows the similarity); here
the budget sets it per head (the b - 1 least similar adjacent pairs split the head into b sets), so memory meets
the target ratio; heads="adaptive" makes it nearly one threshold per layer, heads="threshold" the paper's own.
(2) sigma = sum_{i in S} |k_i - k_p| / (sqrt(2) |S|), so 2 sigma^2 is the squared mean distance to the pivot: our
reading of the kernel width (the paper body, and so its equation numbers, could not be read here; no code is
published). (3) Aggregated attention = the attention each key received from the compressed pass's queries, GQA:
mean over the group (as H2O here). (4) Prefill only: decoded tokens are kept as they come. (5) Every layer keeps
the same budget (the layer policies apply); the paper's thresholds merge less in layers whose keys are less alike.
Passkey retrieval (measured on SmolLM2-135M, bf16, 1k tokens; a limit of the method, not a bug here): 0/10 at 2x,
4x and 8x. The passkey's digits are one token each and their keys are alike (adjacent cosine 0.92 against 0.84 for
all neighbours, the same with RoPE undone), so at 2x 94% of its adjacent digit pairs fall in one merging set
(half of all pairs do) and the values that tell the digits apart are averaged or dropped; the pivots alone fail the
same way, keeping the first 4 and last 32 tokens changes nothing, and forcing just the 10 digit tokens to be pivots
gives 10/10 at 2x and 4x (3/10 at 8x, H2O 2/10) (`notebooks/kvmerger.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.h2o import h2o_accumulate

__all__ = ["KVMerger", "kvmerger_merge", "kvmerger_scores"]


def _in_time_order(x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, H_kv, T, ...) with real tokens sorted by position, padding and holes last; order, valid (B, H_kv, T)."""
    order = torch.where(positions >= 0, positions, torch.iinfo(positions.dtype).max).argsort(dim=-1, stable=True)
    tail = (1,) * (x.dim() - 3)
    return x.gather(2, order.view(*order.shape, *tail).expand_as(x)), order, positions.gather(2, order) >= 0


def _absorbed_at(sim: list[float], attn: list[float]) -> list[float]:
    """Each token's -s*: join adjacent sets from the most similar pair down; a join's pivot is the more attended
    one, the other stops being a pivot at that similarity. The most attended token never does (score 2 > 1)."""
    n = len(attn)
    start, end, pivot = list(range(n)), list(range(n)), list(range(n))  # kept at each set's two ends
    score = [2.0] * n
    for i in sorted(range(n - 1), key=lambda i: -sim[i]):  # the pair (i, i + 1), most similar first
        lo, hi = start[i], end[i + 1]  # the set ending at i and the set starting at i + 1 join into [lo, hi]
        p, q = pivot[i], pivot[i + 1]
        win, lose = (p, q) if attn[p] >= attn[q] else (q, p)
        score[lose] = -sim[i]
        end[lo], start[hi], pivot[lo], pivot[hi] = hi, lo, win, win
    return score


def kvmerger_scores(keys: Tensor, attn: Tensor, positions: Tensor) -> Tensor:
    """(B, H_kv, T) -s*: minus the adjacent-key similarity at which each token stops being a pivot (higher =
    kept longer); -inf for padding and holes. keys (B, H_kv, T, D), attn, positions (B, H_kv, T)."""
    k, order, valid = _in_time_order(keys.float(), positions)
    a = attn.gather(2, order)
    sim = F.cosine_similarity(k[:, :, :-1], k[:, :, 1:], dim=-1)  # (B, H_kv, T - 1) adjacent pairs
    out = torch.full_like(a, -math.inf)
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            n = int(valid[b, h].sum())
            out[b, h, :n] = torch.tensor(_absorbed_at(sim[b, h, :n - 1].tolist(), a[b, h, :n].tolist()))
    return torch.empty_like(out).scatter_(2, order, out)


def kvmerger_merge(keys: Tensor, values: Tensor, kept_k: Tensor, kept_v: Tensor, idx: Tensor, hole: Tensor,
                   positions: Tensor) -> tuple[Tensor, Tensor]:
    """Each kept token (a pivot) becomes the Gaussian-kernel mean of its merging set.

    keys, values (B, H_kv, T, D); kept_k, kept_v (B, H_kv, W, D) = the tokens idx (B, H_kv, W), time order,
    hole True at empty slots; positions (B, H_kv, T). Set boundaries: between consecutive pivots, the least
    similar adjacent pair; tokens before the first pivot join it, those after the last join the last.
    """
    (B, H, T, D), W = keys.shape, idx.shape[-1]
    k, order, valid = _in_time_order(keys.float(), positions)
    v = _in_time_order(values.float(), positions)[0]
    sim = F.cosine_similarity(k[:, :, :-1], k[:, :, 1:], dim=-1)  # pair i = tokens (i, i + 1) in time order
    rank = order.argsort(-1)
    pivot = torch.zeros(B, H, T + 1, dtype=torch.bool, device=keys.device)
    pivot = pivot.scatter_(2, rank.gather(2, idx).masked_fill(hole, T), True)[..., :T]
    seg = pivot.long().cumsum(-1)[..., :-1]  # (B, H, T - 1): pivots at or before pair i's first token
    inner = (seg >= 1) & (seg < pivot.sum(-1, keepdim=True)) & valid[..., 1:]  # pairs between two pivots
    s = sim.masked_fill(~inner, math.inf)
    least = torch.full((B, H, T), math.inf, device=keys.device).scatter_reduce(2, seg, s, "amin")
    cut = inner & (s == least.gather(2, seg))
    i = torch.arange(T - 1, device=keys.device).expand_as(cut)
    first = torch.full((B, H, T), T, device=keys.device).scatter_reduce(2, seg, i.masked_fill(~cut, T), "amin")
    cut &= i == first.gather(2, seg)  # one boundary per gap, the first of equally similar pairs
    set_id = F.pad(cut.long().cumsum(-1), (1, 0)).clamp(max=W - 1)  # (B, H, T): kept slot of each token's set
    dist = (k - kept_k.float().gather(2, set_id[..., None].expand(-1, -1, -1, D))).norm(dim=-1) * valid
    per_set = lambda x: torch.zeros(B, H, W, device=keys.device).scatter_add_(2, set_id, x)  # noqa: E731
    sigma = (per_set(dist) / (math.sqrt(2) * per_set(valid.float()).clamp(min=1))).gather(2, set_id)
    g = torch.where(sigma > 0, torch.exp(-dist ** 2 / (2 * sigma ** 2)), 1.0) * valid  # all alike: equal weights
    w = (g / per_set(g).gather(2, set_id))[..., None]
    index = set_id[..., None].expand(-1, -1, -1, D)
    new_k = torch.zeros(B, H, W, D, device=keys.device).scatter_add_(2, index, w * k)
    new_v = torch.zeros(B, H, W, D, device=keys.device).scatter_add_(2, index, w * v)
    keep = hole[..., None]  # empty slots stay as they were (masked out anyway)
    return torch.where(keep, kept_k, new_k.to(kept_k.dtype)), torch.where(keep, kept_v, new_v.to(kept_v.dtype))


@dataclass
class KVMerger(EvictionMethod):
    """Keep one pivot per merging set of consecutive similar keys, merged with Gaussian-kernel weights; prefill only.

    Args: ratio, budget (merging sets per head), layers, heads: see EvictionMethod.
    """

    @staticmethod
    def _attention(step: Step) -> Tensor:
        """Aggregated attention: what each key received from the pass's queries (GQA: group mean)."""
        return h2o_accumulate(None, step.probs(), step.keys.shape[1])

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return kvmerger_scores(step.keys, self._attention(step), step.positions)

    def merge(self, step, history, idx, hole, k, v):
        return kvmerger_merge(step.keys, step.values, k, v, idx, hole, step.positions)
