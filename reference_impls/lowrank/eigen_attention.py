"""Eigen Attention: keys and values held in the top principal subspace of calibration keys and values.

Paper: Saxena, Saha, Choudhary, Roy, "Eigen Attention: Attention in Low-Rank Space for KV Cache Compression",
arXiv 2408.05646: an SVD of the keys, queries and values that a calibration set produces
gives orthonormal bases P_K, P_V of each layer's key/query and value space; W_K P_K and W_V P_V make r-dim keys and
values, which the cache holds, and attention runs in that space: softmax((Q P_K)(K P_K)^T / sqrt(D)) V P_V P_V^T.
For RoPE models (Figure 6) the cached keys are the r-dim pre-RoPE ones, mapped back to D dims before RoPE.
Official code: https://github.com/UtkarshSaxena1/EigenAttn (`decompose/eigen_attn_utils.py`
generate_basis_vectors_per_layer / _per_head, `models/decompose_modules.py` LlamaEigenAttention)

Presets (official code, Llama path): the key basis is one per layer, from every KV head's pre-RoPE keys (queries
are not used under RoPE); values get one basis per KV head, all of one rank (the largest any head needs); on a
model without RoPE (the OPT/MPT path) each KV head's key basis comes from its keys and its G query heads' queries.
Neither basis is centred (an SVD of the raw vectors). With RoPE, attention with the rebuilt keys is the paper's
RoPE variant; without RoPE, q (k P P^T)^T = (q P)(k P)^T is exactly attention in the low-rank space.
rank_ratio=0.6 is the paper's headline (up to 40% smaller KV cache, Abstract); calibration: "stdlib", 1024 tokens.

Ranks follow the paper's criterion, an explained-variance threshold eps (each basis keeps the fewest directions
holding eps of its calibration energy): `threshold` fixes eps; `rank_ratio` (what `from_ratio` sets) finds the
largest eps, one for every layer and for keys and values, whose ranks hold at most rank_ratio D dims per head on
average, so the keys, which need fewer dims than the values, leave their share to them.

Deviations: (1) The official code lowers eps from 1.0 in steps of 0.02 per layer until the decoder layer's output
error exceeds a budget (0.025), which needs the layer's forward (the interface gives attention's inputs only):
eps is set directly or from the byte target instead; and it thresholds normalised singular values (s / sum s)
where we threshold explained variance (s^2 / sum s^2). (2) Calibration: 1024 tokens of standard-library
docstrings (`Model.calibration`), not 128 x 2048 WikiText-2 tokens averaged in groups (`avg_dim`). (3) Each
forward pass attends over its own exact keys and values, which become latents right after (the prefill attends
in full). (4) Values are rebuilt, not folded into W_o (same numbers). Bytes: latents in the cache's dtype, plus
the bases once per layer (counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model
from reference_impls.lowrank.projection import LowRankProjection, rotate, top_basis

__all__ = ["EigenAttention", "budget_ranks", "explained_variance", "ranks_at"]


def explained_variance(samples: Tensor) -> Tensor:
    """Cumulative explained variance (d,) of the top-1..d directions of samples (N, d), not centred."""
    evals = top_basis(samples, 1)[1]
    return evals.cumsum(0) / evals.sum().clamp(min=1e-30)


def ranks_at(curves: list[Tensor], threshold: float) -> list[int]:
    """For each group of bases sharing one rank (curves (n_sets, D) of cumulative explained variance), the
    largest over its sets of the smallest rank reaching `threshold`."""
    return [min(int((c < threshold - 1e-6).sum(-1).max()) + 1, c.shape[-1]) for c in curves]


def budget_ranks(curves: list[Tensor], budget: int) -> list[int]:
    """`ranks_at` the largest threshold whose ranks sum to at most `budget` (rank 1 everywhere if none does)."""
    candidates = torch.cat([c.flatten() for c in curves]).unique()  # ascending: every threshold that changes a rank
    best, lo, hi = [1] * len(curves), 0, len(candidates) - 1
    while lo <= hi:  # the total rank grows with the threshold: bisect
        mid = (lo + hi) // 2
        ranks = ranks_at(curves, float(candidates[mid]))
        if sum(ranks) <= budget:
            best, lo = ranks, mid + 1
        else:
            hi = mid - 1
    return best


@dataclass
class EigenAttention(LowRankProjection):
    """Keys (before RoPE) and values held as their coordinates on calibration principal bases.

    Args:
        rank_ratio: latent dims kept per head, as a fraction of D averaged over keys, values and layers, in (0, 1]
            (1 keeps all: lossless); None to use `threshold`.
        threshold: explained variance every basis must reach, in (0, 1] (only with rank_ratio=None).
        calib_tokens: calibration prefill length (text "stdlib"), >= 8.
    """

    rank_ratio: Optional[float] = 0.6
    threshold: Optional[float] = None
    calib_tokens: int = 1024

    def __post_init__(self):
        if (self.rank_ratio is None) == (self.threshold is None):
            raise ValueError("EigenAttention: set exactly one of rank_ratio and threshold")
        for knob in ("rank_ratio", "threshold"):
            value = getattr(self, knob)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"EigenAttention: {knob} must be in (0, 1], got {value!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens >= 8):
            raise ValueError(f"EigenAttention: calib_tokens must be an int >= 8, got {self.calib_tokens!r}")

    def bases(self, layer_idx: int, model: Model, H_kv: int, D: int):
        key = ("every layer", H_kv, D)
        if key not in self._memo:  # ranks are shared out over all layers at once
            self._memo[key] = self.all_bases(model, H_kv, D)
        return self._memo[key][layer_idx]

    def all_bases(self, model: Model, H_kv: int, D: int) -> list[tuple[Tensor, int, Tensor, int]]:
        if model.calibration is None:
            raise ValueError("EigenAttention: needs calibration prefills (Model.calibration)")
        groups = []  # per layer: key sample sets, value sample sets; each group of sets gets one rank
        for step in model.calibration("stdlib", self.calib_tokens):
            if model.rope is not None:  # Llama path: one basis for the layer, from every head's pre-RoPE keys
                pre = rotate(step.keys.float(), step.positions, model.rope, inverse=True)[0]  # (H_kv, T, D)
                k_sets = [pre.reshape(-1, D)]
            else:  # no RoPE: per KV head, its keys and its G query heads' queries (heads h = j G + i)
                q = step.queries[0].float().reshape(H_kv, -1, D)  # (H_kv, G T, D)
                k_sets = [torch.cat([step.keys[0, j].float(), q[j]]) for j in range(H_kv)]
            groups += [k_sets, list(step.values[0].float())]  # values: one basis per KV head
        eig = [[top_basis(s, D) for s in sets] for sets in groups]  # (all D eigenvectors, eigenvalues) per set
        curves = [torch.stack([e.cumsum(0) / e.sum().clamp(min=1e-30) for _, e in sets]) for sets in eig]
        if self.threshold is not None:
            ranks = ranks_at(curves, self.threshold)
        else:  # the bytes of rank_ratio D per head for K and V, shared out by one explained-variance threshold
            ranks = budget_ranks(curves, len(curves) * max(1, round(self.rank_ratio * D)))
        bases = [torch.stack([vecs[:, :r] for vecs, _ in sets]) for sets, r in zip(eig, ranks)]
        return [(bases[i], 1, bases[i + 1], 1) for i in range(0, len(bases), 2)]

    def nominal_ratio(self, cache=None) -> float:
        """Full bytes / latent bytes per token with rank_ratio (1 / rank_ratio, or a little more when no threshold
        fills the budget exactly); 1.0 with a threshold (data-dependent, so it takes no share of a composed target,
        like an absolute budget)."""
        return 1.0 if self.rank_ratio is None else 1 / self.rank_ratio

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "EigenAttention":
        """rank_ratio = 1 / ratio, unless the caller fixed rank_ratio or a threshold."""
        if not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise ValueError(f"EigenAttention: ratio must be a number >= 1, got {ratio!r}")
        if knobs.get("threshold") is not None:
            knobs.setdefault("rank_ratio", None)
        return cls(**{"rank_ratio": 1 / ratio, **knobs})
