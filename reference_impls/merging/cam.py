"""CaM: an evicted token's value is added to the next kept tokens' values, with a probability set by its attention.

Paper: Zhang, Du, Luo, Zhong, Zhang, Liu, Ji, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024
(PMLR 235:58840-58850, https://proceedings.mlr.press/v235/zhang24n.html; no arXiv version). Eviction perturbs
the attention output; merging the evicted value into kept ones reduces it. Merge rule (the paper's merge
probability, Eq. 14 as kvpress's port cites it; here read from the official code): the token e leaving the cache
is merged with probability p_e = min(1, A_e / mean_{j in W_e} A_j), where A is the attention a key has received and
W_e the `merge_budget` kept tokens that follow e; when it is, v_j <- v_j + v_e / |W_e| for every j in W_e. Keys
of evicted tokens are dropped. CaM rides on a base eviction: StreamingLLM (default, the official code's) or H2O.
Official code: https://github.com/zyxxmu/cam (`generate_task/streaming_llm/kv_cache_cam.py` `slicev`,
`cam_hf/utils_hh/modify_llama_cam.py` `local_cam_mask`); kvpress's `CAMPress` batches the same rule.
Deviations: (1) As our StreamingLLM, the prompt is prefilled with full attention and compressed after; its
merges are then those of the prompt streamed through CaM, as the official lm-eval code loops over it: in time
order, a token evicted when R tokens follow it (R = the base's recent window) merges into the next
min(merge_budget, R) tokens of the sequence, which carry it on if they leave later (a linear recurrence, solved
at once); p_e uses the attention accumulated over the queries before e leaves. While decoding, one token per
step merges into the kept tokens after it (several at once in a later chunk, as kvpress's CAMPress batches).
(2) A is the attention accumulated over the queries so far (the official streaming code's `accum_attn`, kvpress);
the official lm-eval variant divides by the number of queries (the same ratio) and one variant compares with the
window's max. (3) The Bernoulli draw is a hash of (seed, layer, head, position), so runs are reproducible and a
row of a padded batch draws as if alone. (4) GQA: attention averaged over the query heads of a group (kvpress).
(5) The budget, round(n / ratio) per head, includes the 4 sinks (StreamingLLM base) or the heavy half (H2O
base); the official scripts set start/recent (or heavy/recent) to 10% + 10% of the sequence. The official code
implements the StreamingLLM base; the H2O base applies the same rule to H2O's evictions.

Presets: n_sink 4 (the official streaming `StartRecentKVCache_cam`); merge_budget 32 (official `cam_hf`, kvpress;
the streaming script uses 16); heavy_fraction 0.5 for the H2O base (official heavy_ratio = recent_ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod, evicted
from reference_impls.eviction.h2o import h2o_accumulate, h2o_scores
from reference_impls.eviction.streamingllm import streaming_scores

__all__ = ["CaM", "cam_merge", "cam_stream", "uniform_hash"]


def cam_stream(values: Tensor, probs: Tensor, out: Tensor, draws: Tensor, recent: Tensor, merge_budget: int) -> Tensor:
    """The prompt streamed through CaM (the official lm-eval code's loop): evicted tokens in time order, each
    leaving when `recent` tokens follow it; its value (with what it received) merges into the next
    m = min(merge_budget, recent) tokens, whatever their own fate, which carry it on if they leave later.

    values (B, H_kv, T, D) in time order (a dense prefill; left padding first); probs (B, H_kv, T, T): the
    prefill's attention, GQA-averaged; out (B, H_kv, T) evicted; draws (B, H_kv, T) uniform; recent (B, H_kv).
    p_e compares attention accumulated over the queries before e leaves (rows < e + recent). Returns all values.
    """
    B, H, T, D = values.shape
    e = torch.arange(T, device=values.device)
    m = recent.clamp(max=merge_budget)[..., None]  # (B, H_kv, 1)
    row = (e + recent[..., None] - 1).clamp(0, T - 1)  # (B, H_kv, T): the last query before e leaves
    acc = probs.cumsum(2).view(B, H, T * T)  # [row, x]: the attention x received from queries up to row
    after = torch.arange(1, int(m.max()) + 1, device=values.device)  # e's targets: e + 1 .. e + m
    cols = e[:, None] + after  # (T, M)
    target = (after <= m[..., None]) & (cols < T)  # (B, H_kv, T, M)
    n = target.sum(-1)  # |W_e|
    at = lambda c: acc.gather(2, (row[..., None] * T + c).flatten(2)).view(*c.shape)  # noqa: E731
    mean = (at(cols.clamp(max=T - 1).expand(B, H, T, -1)) * target).sum(-1) / n.clamp(min=1)
    prob = (at(e[:, None].expand(B, H, T, 1))[..., 0] / mean).nan_to_num(nan=0.0, posinf=1.0).clamp(0, 1)
    merged = out & (n > 0) & (draws < prob)
    # v'_t = v_t + sum over merged e with t among its targets of v'_e / |W_e|: a unit lower-triangular system
    gap = e[:, None] - e[None, :]  # (T, T) t - e
    C = ((gap >= 1) & (gap <= m[..., None])) * (merged / n.clamp(min=1))[..., None, :]  # (B, H_kv, T, T)
    eye = torch.eye(T, device=values.device)
    v = torch.linalg.solve_triangular(eye - C, values.float(), upper=False, unitriangular=True)
    return v.to(values.dtype)


def cam_merge(values: Tensor, kept_v: Tensor, idx: Tensor, hole: Tensor, out: Tensor, attn: Tensor,
              positions: Tensor, draws: Tensor, merge_budget: int) -> Tensor:
    """One decoding step's evictions: each evicted token merges into the next `merge_budget` kept tokens after it.

    values (B, H_kv, T, D): every token of the step; kept_v (B, H_kv, W, D): the kept ones, slot j = token idx[j];
    idx, hole (B, H_kv, W) time order, holes last; out (B, H_kv, T) bool: evicted tokens; attn (B, H_kv, T): the
    attention each token received so far; positions (B, H_kv, T); draws (B, H_kv, T) uniform in [0, 1).
    Several tokens evicted at once merge at once (kvpress's batched CAMPress); one per step is the paper's loop.
    """
    W = idx.shape[-1]
    kept_pos = positions.gather(2, idx).masked_fill(hole, torch.iinfo(positions.dtype).max)  # ascending
    count = (~hole).sum(-1, keepdim=True)  # (B, H_kv, 1) kept tokens per head
    start = torch.searchsorted(kept_pos, positions.contiguous(), right=True)  # first kept slot after each token
    stop = torch.minimum(start + merge_budget, count)
    n = (stop - start).clamp(min=0)  # (B, H_kv, T) |W_e|: fewer at the end of the cache
    j = torch.arange(W, device=idx.device)[:, None]
    window = (j >= start[:, :, None, :]) & (j < stop[:, :, None, :])  # (B, H_kv, W, T): slot j is in W_t
    mean = (window * attn.gather(2, idx)[..., None]).sum(2) / n.clamp(min=1)
    prob = (attn / mean).nan_to_num(nan=0.0, posinf=1.0).clamp(0, 1)  # official: nan -> 0, inf -> 1
    merged = out & (n > 0) & (draws < prob)  # Bernoulli(p_e)
    weight = window * (merged / n.clamp(min=1))[:, :, None, :]  # v_j += v_e / |W_e|
    return (kept_v.float() + weight @ values.float()).to(kept_v.dtype)


def _hash32(x: Tensor) -> Tensor:
    """Mix int64 values into [0, 2^32): two multiply-xorshift rounds (a common 32-bit integer hash)."""
    x = x & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def uniform_hash(seed: int, layer: int, positions: Tensor) -> Tensor:
    """(B, H_kv, T) pseudo-random draws in [0, 1), a function of (seed, layer, head, position) only."""
    head = torch.arange(positions.shape[1], device=positions.device)[:, None]
    key = _hash32(torch.tensor((seed * 1_000_003 + layer) * 1_009, device=positions.device) + head)
    return _hash32(_hash32(positions + 1) ^ key).double().div(2 ** 32).float()


@dataclass
class CaM(EvictionMethod):
    """A base eviction (StreamingLLM or H2O) whose evicted values are merged into the kept tokens after them.

    Args (ratio, budget, layers, heads: see EvictionMethod):
        base: "streamingllm" (sinks + recent window) or "h2o" (heavy hitters + recent window).
        n_sink: initial tokens always kept (StreamingLLM base).
        heavy_fraction: share of the budget for heavy hitters (H2O base).
        merge_budget: kept tokens each evicted value is spread over (|W_e|).
        seed: seeds the Bernoulli draws.
    """

    base: str = "streamingllm"
    n_sink: int = 4
    heavy_fraction: float = 0.5
    merge_budget: int = 32
    seed: int = 0
    evict_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (("base", self.base in ("streamingllm", "h2o"), "'streamingllm' or 'h2o'"),
                                  ("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0"),
                                  ("heavy_fraction", isinstance(self.heavy_fraction, (int, float))
                                   and 0 <= self.heavy_fraction <= 1, "a number in [0, 1]"),
                                  ("merge_budget", isinstance(self.merge_budget, int) and self.merge_budget >= 1,
                                   "an int >= 1"),
                                  ("seed", isinstance(self.seed, int), "an int")):
            if not ok:
                raise ValueError(f"CaM: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def observe(self, step: Step, history: Optional[Tensor]) -> Tensor:
        """The attention each held key has received so far (merge probabilities; H2O's score)."""
        return h2o_accumulate(history, step.probs(), step.keys.shape[1])  # holes stay 0, as in H2O

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        if self.base == "streamingllm":
            return streaming_scores(step.positions, self.n_sink)
        n_recent = budget - (budget.double() * self.heavy_fraction).round().long()
        return h2o_scores(history, step.positions, step.n_real(), n_recent)

    def merge(self, step, history, idx, hole, k, v):
        out = evicted(step, idx, hole)
        if not bool(out.any()):
            return k, v
        draws = uniform_hash(self.seed, step.layer_idx, step.positions)
        if step.q_len < step.keys.shape[2]:  # a decoding step: the evicted token merges into kept ones
            return k, cam_merge(step.values, v, idx, hole, out, history, step.positions, draws, self.merge_budget)
        # the prefill (every key is a query of this step): stream it through CaM as the official code does
        count = (~hole).sum(-1)
        recent = count - self.n_sink if self.base == "streamingllm" else count - (count * self.heavy_fraction).round()
        G = step.queries.shape[1] // step.keys.shape[1]
        probs = step.probs().view(*step.keys.shape[:2], G, *step.probs().shape[2:]).mean(2)  # GQA: group mean
        merged = cam_stream(step.values, probs, out, draws, recent.long().clamp(min=0), self.merge_budget)
        return k, merged.gather(2, idx[..., None].expand_as(v))
