"""CaM: an evicted token's value is added to the next kept tokens' values, with a probability set by its attention.

Paper: Zhang, Du, Luo, Zhong, Zhang, Liu, Ji, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024
(PMLR 235:58840-58850, https://proceedings.mlr.press/v235/zhang24n.html; no arXiv version). Eviction perturbs
the attention output; merging the evicted value into kept ones reduces it. Merge rule (the paper's merge
probability, Eq. 14 as kvpress's port cites it; here read from the official code): the token e leaving the cache
is merged with probability p_e = min(1, A_e / mean_{j in W_e} A_j), where A is the attention a key has received and
W_e the `merge_budget` kept tokens that follow e; when it is, v_j <- v_j + v_e / |W_e| for every j in W_e. Keys
of evicted tokens are dropped. CaM rides on a base eviction: StreamingLLM (default) or H2O, as in the paper.
Official code: https://github.com/zyxxmu/cam (`generate_task/streaming_llm/kv_cache_cam.py` `slicev`,
`cam_hf/utils_hh/modify_llama_cam.py` `local_cam_mask`); kvpress's `CAMPress` batches the same rule.
Deviations: (1) the prefill is compressed in one eviction, whose tokens are merged at once (each into the kept
tokens after it, probabilities from the attention before any merge), as kvpress's CAMPress batches it; the
official code evicts one token per step, so a value merged into a token evicted later travels on with it. While
decoding, one token per step, as official. (2) A is the attention accumulated over every query so far (the
official streaming code's `accum_attn`, kvpress); the official lm-eval variant uses the current queries' mean
attention and the max over its window. (3) The Bernoulli draw is a hash of (seed, layer, head, position), so runs
are reproducible and a row of a padded batch draws as if alone. (4) GQA: A is averaged over the query heads of a
group (kvpress). (5) The budget, round(n / ratio) per head, includes the 4 sinks (StreamingLLM base) or the recent
half (H2O base); the official scripts set start/recent (or heavy/recent) to 10% + 10% of the sequence.

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

__all__ = ["CaM", "cam_merge", "uniform_hash"]


def cam_merge(values: Tensor, kept_v: Tensor, idx: Tensor, hole: Tensor, out: Tensor, attn: Tensor,
              positions: Tensor, draws: Tensor, merge_budget: int) -> Tensor:
    """The kept values after merging every evicted token whose draw falls below its merge probability.

    values (B, H_kv, T, D): every token of the step; kept_v (B, H_kv, W, D): the kept ones, slot j = token idx[j];
    idx, hole (B, H_kv, W) time order, holes last; out (B, H_kv, T) bool: evicted tokens; attn (B, H_kv, T): the
    attention each token received; positions (B, H_kv, T); draws (B, H_kv, T) uniform in [0, 1).
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
        return h2o_accumulate(history, step.probs(), step.keys.shape[1]).masked_fill(~step.valid, 0.0)

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
        return k, cam_merge(step.values, v, idx, hole, out, history, step.positions, draws, self.merge_budget)
