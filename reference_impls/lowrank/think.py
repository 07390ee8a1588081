"""ThinK: drop the key channels the latest queries use least; the kept channels are stored, the others read as 0.

Paper: Xu, Jie, Dong, Wang, Lu, Zhou, Saha, Xiong, Sahoo, "ThinK: Thinner Key Cache by Query-Driven Pruning",
arXiv 2407.21018 (ICLR 2025), Section 3 (method): channel pruning as keeping the attention weights of the observation
window's queries; its greedy solution scores channel j of head i by Score_i[j] = ||Q_i^obs[:, j] K_i[:, j]^T||_F,
keeps the top T = D - floor(lambda D) channels of every head (lambda: the pruning ratio, the same in every head
and layer) and stores the thinned keys with a binary channel mask (Figure 1). Values are not pruned: the ICLR version's
method and the official code prune keys only (the first arXiv version's abstract mentions extending it to value
channels; not implemented here), so K + V shrinks by less than 2x, whatever lambda.
Official code: https://github.com/SalesforceAIResearch/ThinK (`ThinK_flash/src/kv_pruning_utils.py`
`key_pruner_query_driven`, `llama_model.py` `recover_cache`, `scripts/scripts_longBench/eval.sh`)
Presets (official code): pruning_ratio=0.4 (`--pruning_ratio` default and the LongBench scripts; the paper also
reports 0.5), window=32 (the last 32 queries score the channels), recent=32 (`recent_size`: the newest 32
prompt tokens keep all their channels). Tokens that arrive after the compressing pass are stored whole.

Q[:, j] K[:, j]^T is an outer product, so its Frobenius norm is ||Q[:, j]|| ||K[:, j]||: a product of two
column norms (the official code ranks by mean(Q[:, j]^2) mean(K[:, j]^2), the same order).
Deviations: (1) GQA: the official code copies the keys to every query head and prunes each copy; we keep one
copy per KV head and score it with the window queries of its G query heads stacked (G w rows, the Frobenius
norm of the whole group's logits), which ranks as kvpress's ThinKPress (the group's mean of mean(q^2)).
(2) The mask is bit-packed (D bits per head); the kept keys stay in the model's dtype. (3) Padding queries and
keys (positions -1) are left out of the norms (the official code runs batch 1). (4) Composed with an eviction
method that evicts while decoding (H2O, StreamingLLM here), the channels are chosen again each time the kept
tokens are re-stored, from that step's queries (the official code compresses the prompt once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.quantization.primitives import pack, unpack
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["ThinK", "think_channels", "think_prune", "think_restore", "think_scores"]


def think_scores(q_obs: Tensor, k: Tensor, *, q_valid: Optional[Tensor] = None,
                 k_valid: Optional[Tensor] = None) -> Tensor:
    """Score of each key channel: ||Q_obs[:, j] K[:, j]^T||_F = ||Q_obs[:, j]|| ||K[:, j]||, per KV head (fp32).

    q_obs (B, H, w, D): the observation window's queries (the G query heads of a KV head count as G w rows);
    k (B, H_kv, T, D). q_valid (B, w), k_valid (B, H_kv, T) bool: False rows (padding) count as zeros.
    Returns (B, H_kv, D).
    """
    (B, H, w, D), H_kv = q_obs.shape, k.shape[1]
    q, k = q_obs.float(), k.float()
    if q_valid is not None:
        q = q * q_valid[:, None, :, None]
    if k_valid is not None:
        k = k * k_valid[..., None]
    q_norm = q.reshape(B, H_kv, (H // H_kv) * w, D).norm(dim=2)  # heads h = kv G + g are consecutive
    return q_norm * k.norm(dim=2)


def think_channels(scores: Tensor, keep: int) -> Tensor:
    """(B, H_kv, D) scores -> (B, H_kv, D) bool mask of the `keep` best channels of each head."""
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def think_prune(k: Tensor, mask: Tensor) -> Tensor:
    """k (B, H_kv, n, D), mask (B, H_kv, D) with `keep` True per head -> (B, H_kv, n, keep), channels in order."""
    B, H_kv, n, _ = k.shape
    return k.masked_select(mask[:, :, None, :]).view(B, H_kv, n, -1)


def think_restore(kept: Tensor, mask: Tensor) -> Tensor:
    """Inverse of think_prune, with zeros in the pruned channels: (B, H_kv, n, keep) -> (B, H_kv, n, D)."""
    B, H_kv, n, _ = kept.shape
    full = mask[:, :, None, :].expand(B, H_kv, n, mask.shape[-1])
    return kept.new_zeros(full.shape).masked_scatter(full, kept)


@dataclass
class ThinK(Quantizer):
    """Query-driven key channel pruning of the prompt (all but its `recent` newest tokens); values kept whole.

    Args:
        pruning_ratio: lambda in [0, 1), the fraction of key channels pruned per head: floor(lambda D) of D
            (official default 0.4; the paper also runs 0.5).
        window: the newest queries that score the channels (official: 32).
        recent: the newest prompt tokens whose keys keep every channel (official `recent_size`: 32).
    """

    pruning_ratio: float = 0.4
    window: int = 32
    recent: int = 32

    def __post_init__(self):
        if not (isinstance(self.pruning_ratio, (int, float)) and 0 <= self.pruning_ratio < 1):
            raise ValueError(f"ThinK: pruning_ratio must be a number in [0, 1), got {self.pruning_ratio!r}")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"ThinK: window must be an int >= 1, got {self.window!r}")
        if not (isinstance(self.recent, int) and self.recent >= 0):
            raise ValueError(f"ThinK: recent must be an int >= 0, got {self.recent!r}")

    def kept_channels(self, head_dim: int) -> int:
        """T = D - floor(lambda D), as the official code's `int(head_dim * ratio)` pruned channels."""
        return head_dim - int(head_dim * self.pruning_ratio)

    def flush(self, held_k: int, held_v: int, buffered: int, step: Step) -> tuple[int, int]:
        # only the compressing pass prunes, all but the `recent` newest keys; values are never encoded
        return (max(buffered - self.recent, 0) if step.compress else 0), 0

    def encode(self, k, v, step, state) -> dict:
        obs = step.last(self.window)  # the observation window: the newest queries of the compressing pass
        scores = think_scores(obs.queries, step.keys, q_valid=obs.q_real, k_valid=step.valid)
        mask = think_channels(scores, self.kept_channels(k.shape[-1]))
        return {"k": think_prune(k, mask), "mask": pack(mask.to(torch.uint8), 1), "head_dim": k.shape[-1]}

    def decode(self, block, dtype, state):
        mask = unpack(block["mask"], 1, block["head_dim"]).bool()
        return think_restore(block["k"], mask).to(dtype), None

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after T prompt tokens: T - recent keys of T channels, `recent` whole keys,
        a D-bit mask, every value whole."""
        T, D, cb = cache.tokens, cache.head_dim, cache.bits
        n = max(T - self.recent, 0)
        keys = n * self.kept_channels(D) * cb + (T - n) * D * cb + 8 * math.ceil(D / 8)
        return cache.full_bits() / (keys + T * D * cb)

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["ThinK"]:
        """lambda = 0.1 .. 0.9, least pruning first. Values stay whole, so the ratio stays below 2x: on the
        benchmark's cache (16-bit, D = 64, 1.5k tokens) lambda 0.4 gives 1.24x, 0.5 1.32x, 0.7 1.52x, 0.9
        1.77x; targets of 1.8x and above all get lambda = 0.9 (7 of 64 channels), the closest reachable."""
        return [cls(pruning_ratio=p / 10) for p in range(1, 10)]
