"""LagKV: score each chunk of keys/values against the min/max of the chunk after it; no queries, no attention.

Paper: Liang, Zhang, Li, Li, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
arXiv 2504.04704, Section 3: after n_sink sink tokens the cache is cut into partitions of lag_size tokens; each
partition p is min-max normalised per channel with the statistics of partition p + 1 (the "lag" reference),
    s_i = softmax_p( std_c (k_i - min K_{p+1}) / (max K_{p+1} - min K_{p+1}) ) + (the same for v_i),
and the top of each partition is kept; the last full partition (it has no successor yet) and the remainder are
kept in full, like the sinks.
Official code: https://github.com/AI-Lab-China-Merchants-Bank/LagKV (`lag_kv.py`, `_get_states_score`,
`_compress_algo`); kvpress: `LagKVPress`.
Presets: kvpress's LagKVPress defaults (n_sink=4, lag_size=128); the official cache class defaults to
sink_size=16, lag_size=1024 (its README uses lag_size 64 and 128), too long for prompts of ~1k tokens.
Deviations: (1) as kvpress: a budget over the whole layer instead of the official fixed share (`ratio`) of every
partition; partitions are ranked within themselves (rank / lag_size) so a global top-k takes the same number of
tokens from each (ties between partitions go to the later one; kvpress leaves them to top-k), and key and value
scores are averaged (official: summed, values weighted by score_v_ratio = 1: the same order). (2) Compresses at the
compressing pass (the prefill) only, as kvpress does; the official cache re-compresses whenever a new partition
completes while decoding. (3) A prompt shorter than n_sink + 2 lag_size has no partition to score: sinks, then
the most recent tokens are kept (kvpress's rule). (4) When the budget cannot hold sinks + the unscored tail, the
sinks and the most recent tail tokens are kept (kvpress: an arbitrary choice among tied scores).
(5) `cross_scoring=True` (kvpress's experimental option) compares the raw scores across partitions instead.
Note: scores read post-RoPE keys channel by channel (as both codes do), so they depend on absolute positions; a
left-padded row keeps what it keeps alone when its positions count from its first real token (as `generate` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["LagKV", "lag_relative_scores", "lagkv_scores"]


def lag_relative_scores(x: Tensor, lag_size: int) -> Tensor:
    """x (B, H_kv, P * lag_size, D), P >= 2 partitions -> (B, H_kv, (P - 1) * lag_size): each token of partitions
    0 .. P - 2 normalised by the next partition's per-channel min/max, std over channels, softmax per partition."""
    B, H, n, D = x.shape
    parts = x.float().view(B, H, n // lag_size, lag_size, D)
    ref, cur = parts[:, :, 1:], parts[:, :, :-1]  # partition p is judged against partition p + 1
    lo, hi = ref.min(dim=3, keepdim=True).values, ref.max(dim=3, keepdim=True).values
    spread = ((cur - lo) / (hi - lo)).std(dim=-1)  # (B, H, P - 1, lag): unbiased, as torch.std (both codes)
    return spread.softmax(dim=-1).flatten(2)


def lagkv_scores(k: Tensor, v: Tensor, *, n_sink: int = 4, lag_size: int = 128, cross_scoring: bool = False) -> Tensor:
    """Scores of a dense sequence k, v (B, H_kv, T, D): sinks > unscored tail (recent first) > scored partitions.

    Scored tokens get their rank within their partition / lag_size, in [0, 1) (or, with cross_scoring, the score
    itself, in (0, 1)); the unscored tail (the last full partition and the remainder) 1 + recency in [1, 2);
    sinks 3 + earliness. Returns (B, H_kv, T).
    """
    B, H, T, _ = k.shape
    pos = torch.arange(T, device=k.device, dtype=torch.float32)
    out = (1 + pos / T).expand(B, H, T).clone()  # too short to score: the most recent first (kvpress)
    n_parts = (T - n_sink) // lag_size
    if n_parts >= 2:
        end = n_sink + (n_parts - 1) * lag_size  # the scored partitions end here; the reference of the last one
        score = (lag_relative_scores(k[:, :, n_sink:end + lag_size], lag_size)
                 + lag_relative_scores(v[:, :, n_sink:end + lag_size], lag_size)) / 2
        if not cross_scoring:  # rank within the partition; later partitions win ties (+ p / (P lag))
            p = torch.arange(n_parts - 1, device=k.device).repeat_interleave(lag_size)
            rank = score.view(B, H, n_parts - 1, lag_size).argsort(-1).argsort(-1).flatten(2)
            score = (rank + p / (n_parts - 1)) / lag_size
        out[:, :, n_sink:end] = score
    out[:, :, :n_sink] = 3 + (n_sink - pos[:n_sink]) / max(n_sink, 1)  # sinks, the earliest first
    return out


@dataclass
class LagKV(EvictionMethod):
    """Lag-relative key/value statistics, partition by partition; sinks and the last partition kept; prefill only.

    Args (ratio, budget, layers, heads: see EvictionMethod):
        n_sink: first tokens always kept (>= 0). lag_size: partition length (>= 1).
        cross_scoring: compare raw scores across partitions (kvpress's experimental option) instead of ranks.
    """

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0"),
                                  ("lag_size", isinstance(self.lag_size, int) and self.lag_size >= 1, "an int >= 1"),
                                  ("cross_scoring", isinstance(self.cross_scoring, bool), "True or False")):
            if not ok:
                raise ValueError(f"LagKV: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        knobs = dict(n_sink=self.n_sink, lag_size=self.lag_size, cross_scoring=self.cross_scoring)
        valid = step.valid
        if bool(valid.all()):
            return lagkv_scores(step.keys, step.values, **knobs)
        # left padding (or holes): each row and head is scored on its own real tokens, which are in time order
        out = torch.zeros(valid.shape, device=valid.device)
        for b, h in valid.any(-1).nonzero().tolist():
            idx = valid[b, h].nonzero().squeeze(-1)
            out[b, h, idx] = lagkv_scores(step.keys[b:b + 1, h:h + 1, idx], step.values[b:b + 1, h:h + 1, idx],
                                          **knobs)[0, 0]
        return out
