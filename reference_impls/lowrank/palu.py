"""Palu: cache a rank-r latent per group of KV heads; rebuild keys (then apply RoPE) and values when attending.

Paper: Chang, Lin, Lin, Chen, Hu, Wang, Huang, Ceze, Abdelfattah, Wu, "Palu: KV-Cache Compression with Low-Rank
Projection", arXiv 2407.21118 (ICLR 2025): the K and V projections are factorised by truncated SVD, W ~ A B; the
cache holds the down-projection's output h = x A (rank r) and the up-projection B rebuilds keys, to which RoPE is
applied only then, and values (B_v fusable into W_o). Decomposition granularity: per head (M-LRD), all heads
jointly (J-LRD) or per group of g heads (G-LRD, the recommended middle ground).
Official code: https://github.com/shadowpa0327/Palu (`palu/model/modules/svd_linear.py` HeadwiseLowRankModule,
`palu/decomposition.py`, `compress.py`)

In nn.Linear's terms (k = x W^T, W (g D, d) for a group): W = U S V^T, W_r = U_r S_r V_r^T, and Palu's latent is
h = x V_r S_r^(1/2), rebuilt as h (U_r S_r^(1/2))^T. Since k U_r = x V_r S_r, the latent is exactly the pre-RoPE
key's coordinates k U_r (up to the fixed scale S_r^(1/2)), and k U_r U_r^T = x W_r^T: the store takes the keys it is
given, undoes RoPE and keeps k U_r. With the official default `--decompose_method whiten` (SVD-LLM's whitening: the
SVD of W C, C the Cholesky factor of the calibration inputs' X^T X) U_r is instead the top-r eigenvectors of
W X^T X W^T = K^T K, K the calibration pre-RoPE keys: the rank-r map that loses least on the calibration data.

Presets (official code): decompose="whiten", group_size=4 (`--head_group_size 4`, counted in KV heads as the
official `get_kv_info` does: groups of g consecutive KV heads of W_k, W_v; a g above H_kv is clamped to H_kv, one
joint group, which is what SmolLM2-135M's 3 KV heads get), rank_ratio=0.5 (the paper's 50% headline setting;
`--param_ratio_target`).

Deviations: (1) One rank in every layer (the official `--search_method uniform`), the same for K and V unless
`value_rank_ratio` sets them apart by hand: the paper's Fisher-information rank search needs the loss's weight
gradients, which the interface does not expose; ranks are not rounded to multiples of 32 either. (2) Whitening
calibrates on 1024 tokens of standard-library docstrings (`Model.calibration`), not 256 x 2048 WikiText-2
tokens. (3) The latent is held as k U_r (Palu's h scaled by S_r^(1/2): same bytes, same reconstruction); Palu's
optional latent quantization (Hadamard + 3-bit) is not implemented. (4) Each forward pass attends over its own
exact keys and values, which become latents right after (the prefill attends in full; a decoded token sees its
own key exact); Palu's factorised projections make even those low-rank. (5) Values are rebuilt, not folded into
W_o (the same numbers, more compute). (6) A projection bias (Qwen) is projected with the key instead of being
added after the up-projection.
Bytes: latents in the cache's dtype, plus the two bases U_r (K, V) once per layer (model-side factors, counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model
from reference_impls.lowrank.projection import LowRankProjection, group_heads, rotate, top_basis

__all__ = ["Palu", "palu_rank", "svd_basis", "whitened_basis"]


def palu_rank(rank_ratio: float, group_dim: int) -> int:
    """Latent dimensions kept per group: round(rank_ratio * g D), at least 1."""
    return max(1, round(rank_ratio * group_dim))


def svd_basis(w: Tensor, group_dim: int, rank: int) -> Tensor:
    """Plain SVD per group: w (H_kv D, d) as nn.Linear holds it -> U_r (H_kv D / group_dim, group_dim, rank)."""
    return torch.linalg.svd(w.float().reshape(-1, group_dim, w.shape[-1]), full_matrices=False).U[..., :rank]


def whitened_basis(x: Tensor, g: int, rank: int) -> Tensor:
    """Whitened SVD per group from its outputs x (1, H_kv, T, D) on calibration text (pre-RoPE keys, or values):
    the top-rank eigenvectors of X^T X per group -> (H_kv / g, g D, rank)."""
    return torch.stack([top_basis(s, rank)[0] for s in group_heads(x.float(), g)[0]])


@dataclass
class Palu(LowRankProjection):
    """Keys (before RoPE) and values held as rank-r latents per group of KV heads (G-LRD).

    Args:
        rank_ratio: fraction of each group's g D dimensions kept, in (0, 1] (1/ratio; 1 keeps all: lossless).
        value_rank_ratio: the same for values, in (0, 1]; None: rank_ratio (the paper's rank search sets K and V
            ranks apart; here by hand).
        group_size: KV heads per decomposition group, >= 1 (1: M-LRD; >= H_kv: J-LRD); must divide H_kv if below.
        decompose: "whiten" (official default: bases from calibration keys/values) or "svd" (from W_k, W_v alone).
        calib_tokens: calibration prefill length for "whiten" (text "stdlib").
    """

    rank_ratio: float = 0.5
    value_rank_ratio: Optional[float] = None
    group_size: int = 4
    decompose: str = "whiten"
    calib_tokens: int = 1024

    def __post_init__(self):
        for knob in ("rank_ratio", "value_rank_ratio"):
            value = getattr(self, knob)
            if not (isinstance(value, (int, float)) and 0 < value <= 1) and (knob == "rank_ratio" or value is not None):
                raise ValueError(f"Palu: {knob} must be in (0, 1], got {value!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"Palu: group_size must be an int >= 1, got {self.group_size!r}")
        if self.decompose not in ("whiten", "svd"):
            raise ValueError(f"Palu: decompose must be 'whiten' or 'svd', got {self.decompose!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens >= 8):
            raise ValueError(f"Palu: calib_tokens must be an int >= 8, got {self.calib_tokens!r}")

    def bases(self, layer_idx: int, model: Model, H_kv: int, D: int):
        g = min(self.group_size, H_kv)
        if H_kv % g:
            raise ValueError(f"Palu: group_size must divide the number of KV heads ({H_kv}) or exceed it, "
                             f"got {self.group_size}")
        rk, rv = palu_rank(self.rank_ratio, g * D), palu_rank(self.value_rank_ratio or self.rank_ratio, g * D)
        if self.decompose == "svd":
            if model.weights is None:
                raise ValueError("Palu: decompose='svd' needs the model's projection weights (Model.weights)")
            w = model.weights(layer_idx)
            return svd_basis(w["k"], g * D, rk), g, svd_basis(w["v"], g * D, rv), g
        if model.calibration is None:
            raise ValueError("Palu: decompose='whiten' needs calibration prefills (Model.calibration)")
        step = model.calibration("stdlib", self.calib_tokens)[layer_idx]
        pre = rotate(step.keys.float(), step.positions, model.rope, inverse=True)  # K = X W_k^T, before RoPE
        return whitened_basis(pre, g, rk), g, whitened_basis(step.values, g, rv), g

    def nominal_ratio(self, cache=None) -> float:
        """Full bytes / latent bytes per token (2 g D / (r_k + r_v)); the per-layer bases are left out."""
        return 2 / (self.rank_ratio + (self.value_rank_ratio or self.rank_ratio))

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "Palu":
        """rank_ratio = 1 / ratio for keys and values (unless fixed; with value_rank_ratio fixed, keys get the rest of
        the target): the latents are 1/ratio of a 16-bit cache in a 16-bit model."""
        if not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise ValueError(f"Palu: ratio must be a number >= 1, got {ratio!r}")
        if knobs.get("value_rank_ratio") is not None and "rank_ratio" not in knobs:  # keys take what values leave
            knobs["rank_ratio"] = 2 / ratio - knobs["value_rank_ratio"]
        return cls(**{"rank_ratio": 1 / ratio, **knobs})
