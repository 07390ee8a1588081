"""Scissorhands: drop the tokens that the last w queries most often found unimportant; keep a recent window.

Paper: Liu, Desai, Liao, Wang, Xie, Xu, Kyrillidis, Shrivastava, "Scissorhands: Exploiting the Persistence of
Importance Hypothesis for LLM KV Cache Compression at Test Time", arXiv 2305.17118 (NeurIPS 2023): Section 3
(persistence of importance: tokens that drew high attention at one step keep drawing it later), Section 4
(Algorithm 1: a cache of fixed budget B per head, compressed whenever it fills; Algorithm 2: over a history
window of the last w queries count, per token, how often its attention fell below the uniform average, shield
the r most recent tokens, drop the m tokens with the highest counts). The paper text could not be opened from
this workspace: these details follow the task brief and secondary summaries and are not checked line by line.
Official code: https://github.com/lzcemma/Scissorhands (checked: only a perplexity simulation,
`Decentralized_FM_alpha/modules/hf_opt_dropkv.py`: for each query i >= 100 a key stays visible if, in at least
one of the previous LRU_WINDOW = 100 queries, its attention exceeded that query's 90th-percentile weight, or if
it is among the last POSITION_WINDOW = 10 positions; no fixed budget, layers 5-35 of OPT-66B only).
Deviations: (1) GQA: the paper is multi-head; a query's vote uses the attention averaged over the G query heads
of its group (as H2O here), which is itself a distribution over the keys, so 1/n stays its uniform average.
(2) Threshold 1/n with n the keys that query actually attended (the uniform average of its softmax): equal to
1/t (the paper's average, as summarised) without eviction, larger once the cache holds fewer than t tokens.
(3) The prompt is cut to the budget at the compressing pass using the votes of its last w queries only, so a token
far from the end is never judged by its neighbours (in Algorithm 1 every token is judged soon after it arrives);
afterwards every decoded token evicts one token (m = 1), so memory stays flat at B (the paper drops m tokens
whenever the cache fills). (4) Budget = round(n / ratio) tokens per head at the compressing pass (or `budget`), then
fixed; w = 100 and r = 10 follow the official script. (5) Votes are exact over the window: each key keeps one bit
per window query in a ring (query at stream index s in bit s mod w), ceil(w/8) bytes per key and head, counted in
nbytes. (6) Ties between equal counts (small integers) go to the more recent token, so the choice is deterministic
and padding-independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step, attention_probs
from reference_impls.eviction.base import EvictionMethod

__all__ = ["Scissorhands", "scissorhands_scores", "unimportant_votes", "window_counts", "window_update"]


def unimportant_votes(q: Tensor, k: Tensor, allowed: Optional[Tensor], scaling: float) -> Tensor:
    """Which keys each query found unimportant: group-mean attention below the uniform average 1/n.

    q (B, H, n, D) the window's queries; k (B, H_kv, T, D); allowed (B, H_kv, n, T) bool, the keys each query
    attended (None: all, `Step.attn_mask`). Returns (B, H_kv, n, T) bool, False where not allowed (no vote).
    """
    B, H, n, _ = q.shape
    p = attention_probs(q, k, allowed, scaling).view(B, k.shape[1], H // k.shape[1], n, -1).mean(2)  # GQA: group mean
    if allowed is None:  # every key seen: the uniform average is 1 / T
        return p < 1.0 / k.shape[2]
    uniform = 1.0 / allowed.sum(-1, keepdim=True).clamp(min=1)  # (B, H_kv, n, 1)
    return allowed & (p < uniform)


def window_update(bits: Optional[Tensor], votes: Tensor, first, window: int) -> Tensor:
    """Write this step's votes into every key's ring of the last `window` queries (Alg. 2's history window).

    bits (B, H_kv, T_old, ceil(w / 8)) uint8 for the keys held before this step, or None; votes (B, H_kv, n, T)
    for the queries at positions first .. first + n - 1 of each row (n <= window; first an int or (B,)). Query
    s owns bit s mod window, so writing it overwrites the query that left the window; new keys start with no
    votes. Returns (B, H_kv, T, nb).
    """
    B, H_kv, n, T = votes.shape
    if bits is None:
        bits = torch.zeros(B, H_kv, 0, (window + 7) // 8, dtype=torch.uint8, device=votes.device)
    out = torch.nn.functional.pad(bits, (0, 0, 0, T - bits.shape[2]))  # new keys start with no votes
    # one bit column per query, edited in the packed bytes: a decoding step (n = 1) touches one byte per key
    # instead of unpacking every key's whole ring, at every step of every layer
    for b, first_b in enumerate(torch.as_tensor(first).expand(B).tolist()):
        for j in range(n):
            byte, bit = divmod((first_b + j) % window, 8)
            column = out[b, :, :, byte]  # (H_kv, T), a view
            column.bitwise_and_(255 ^ (1 << bit)).bitwise_or_(votes[b, :, j].to(torch.uint8) << bit)
    return out


#: bits set in each byte value, so counting votes needs no unpacking
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def window_counts(bits: Tensor) -> Tensor:
    """(B, H_kv, T, nb) ring bits -> (B, H_kv, T) number of window queries that found each key unimportant."""
    return _POPCOUNT.to(bits.device).take(bits.long()).sum(-1)


def scissorhands_scores(counts: Tensor, positions: Tensor, n_real: Tensor, n_recent: int) -> Tensor:
    """Recent window first, then the fewest unimportant votes; ties go to the more recent token.

    counts (B, H_kv, T); positions (B, H_kv, T) real-token positions, -1 for holes; n_real (B,) tokens seen;
    n_recent: the r most recent tokens are always kept. Returns (B, H_kv, T) float64, higher = keep.
    """
    recency = positions.double() / (n_real[:, None, None] + 1)  # in [0, 1): below one vote
    recent = positions >= (n_real - n_recent)[:, None, None]
    score = torch.where(recent, 1.0 + recency, recency - counts.double())  # every recent token outranks the rest
    return score.masked_fill(positions < 0, float("-inf"))


@dataclass
class Scissorhands(EvictionMethod):
    """Fewest "unimportant" votes over the last w queries, plus the r most recent tokens; evicts while decoding.

    Args:
        ratio: target tokens seen / tokens kept (at the compressing pass; the budget then stays fixed).
        budget: absolute tokens kept per layer and head; overrides ratio.
        history_window: w, the number of most recent queries whose votes count (>= 1).
        recent_window: r, the most recent tokens always kept (>= 0).
    """

    history_window: int = 100
    recent_window: int = 10
    evict_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.history_window, int) and self.history_window >= 1):
            raise ValueError(f"Scissorhands: history_window must be an int >= 1, got {self.history_window!r}")
        if not (isinstance(self.recent_window, int) and self.recent_window >= 0):
            raise ValueError(f"Scissorhands: recent_window must be an int >= 0, got {self.recent_window!r}")

    def observe(self, step: Step, history: Optional[Tensor]) -> Tensor:
        """Each held key's ring of votes, this step's last min(q, w) queries written in (older ones left the window)."""
        obs = step.last(self.history_window)  # a padding query sees nothing, so it votes for nothing
        votes = unimportant_votes(obs.queries, step.keys, obs.attn_mask, step.scaling)
        # a query's ring slot is its position in its row (a padding query's is below 0 and holds no vote)
        return window_update(history, votes, obs.q_positions[:, -1] - (obs.q_len - 1), self.history_window)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return scissorhands_scores(window_counts(history), step.positions, step.n_real(), self.recent_window)
