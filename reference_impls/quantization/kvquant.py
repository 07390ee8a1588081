"""KVQuant: keys per channel before RoPE, values per token, on non-uniform levels fitted per layer, outliers sparse.

Paper: Hooper, Kim, Mohammadzadeh, Mahoney, Shao, Keutzer, Gholami, "KVQuant: Towards 10 Million Context Length
LLM Inference with KV Cache Quantization", arXiv 2401.18079 (NeurIPS 2024), Section 3: per-channel key
quantization; pre-RoPE key quantization; nuqX, a per-layer non-uniform datatype (k-means centroids of
normalized calibration activations); per-vector dense-and-sparse quantization (1% outliers kept in fp16);
attention-sink-aware quantization (the first token kept in fp16 and left out of calibration).
Official code: https://github.com/SqueezeAILab/KVQuant (`deployment/kvquant/simquant_module_quantizer.py`)
Deviations: (1) the calibration set is the compressing pass itself (the prompt), not offline Wikitext-2: it
fixes the layer's nuqX levels (one set for keys, one for values) and each row's per-channel key ranges.
(2) Plain k-means, without the paper's Fisher-information weights (they need gradients). (3) A vector's
outliers are its ceil(f n / 2) largest and smallest entries (the official `cap_outliers` count); a key
channel's range then stays fixed and any later entry outside it is an outlier, as with the official offline
thresholds. Outliers are flat int32 indices + exact values (the official kernels use CSR/CSC). (4) RoPE is
undone with the model's own rotary embedding (`Model.rope`), or rebuilt from `rope_theta` when the model
gives none (see `KVQuant`). (5) No Q-Norm: the paper's 2-bit results use Q-Norm, a correction that matches the mean and
spread of the de-quantized distribution to the original's; here the levels are used as fitted, so the low rungs that `from_ratio` picks at 4x and 8x (3 and 1 bits) are weaker than the paper's nuq2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import Model
from reference_impls.quantization.primitives import SparseRows, dense_range, pack, unpack
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import QuantizedStore, Quantizer

__all__ = ["KVQuant", "apply_rope", "fit_levels", "kvquant_fake", "normalize", "nuq_dequantize",
           "nuq_quantize", "rope_cos_sin"]


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Default (Llama) RoPE, computed in fp32 as transformers does: positions (..., T) -> cos, sin (..., T, D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """x cos + rotate_half(x) sin, x (..., T, D), cos/sin broadcastable to it (transformers' layout).

    transformers may fold an attention scaling a into both (cos = a cos(t), sin = a sin(t): yarn, longrope), so
    the forward map is a times a rotation; its inverse is the transposed rotation (sin negated) divided by
    a^2 = cos^2 + sin^2, exact for any a, and 1 up to rounding for plain RoPE.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    if not inverse:
        return (x.float() * cos + sin * torch.cat([-x2, x1], dim=-1)).to(x.dtype)
    return ((x.float() * cos - sin * torch.cat([-x2, x1], dim=-1)) / (cos * cos + sin * sin)).to(x.dtype)


def normalize(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Map each vector's dense range [lo, hi] onto [-1, 1] (the official code's zero point and range)."""
    return (x.float() - (hi.float() + lo.float()) / 2) / ((hi.float() - lo.float()) / 2).clamp(min=1e-8)


def fit_levels(x: Tensor, bits: int, iters: int = 30) -> Tensor:
    """nuqX: 2^bits levels for a sample x in [-1, 1], by 1-D k-means (Lloyd) started at quantiles. fp32, sorted.

    On sorted data each cluster is a run of samples: boundaries by binary search, sums by prefix sums.
    """
    x, n = x.double().flatten().sort().values, 2 ** bits
    if x.numel() == 0:
        return torch.linspace(-1, 1, n)
    csum = torch.cat([x.new_zeros(1), x.cumsum(0)])
    levels = x[((torch.arange(n) + 0.5) / n * x.numel()).long()]
    for _ in range(iters):
        mids = (levels[1:] + levels[:-1]) / 2  # a sample joins its nearest level (ties go to the lower one)
        ends = torch.cat([x.new_zeros(1, dtype=torch.long), torch.searchsorted(x, mids, right=True),
                          torch.tensor([x.numel()])])
        counts = ends[1:] - ends[:-1]
        sums = csum[ends[1:]] - csum[ends[:-1]]
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels).sort().values  # empty cluster: stays
    return levels.float()


def nuq_quantize(x: Tensor, lo: Tensor, hi: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest level of each normalized entry -> (codes uint8, outlier mask: the entries outside [lo, hi])."""
    codes = torch.bucketize(normalize(x, lo, hi).contiguous(), (levels[1:] + levels[:-1]) / 2)
    return codes.to(torch.uint8), (x < lo) | (x > hi)


def nuq_dequantize(codes: Tensor, lo: Tensor, hi: Tensor, levels: Tensor) -> Tensor:
    """levels[codes] mapped back from [-1, 1] to each vector's range (fp32)."""
    lo, hi = lo.float(), hi.float()
    return levels[codes.long()] * ((hi - lo) / 2).clamp(min=1e-8) + (hi + lo) / 2


def kvquant_fake(x: Tensor, *, bits: int, outlier_frac: float, dim: int, keep: Optional[Tensor] = None):
    """The reference round trip of one tensor -> (x_hat, outlier mask, levels), outliers exact in x_hat.

    x (B, H_kv, T, D); dim=2 (over tokens): per channel, as for pre-RoPE keys; dim=3: per token, as for values.
    """
    lo, hi = dense_range(x, outlier_frac, dim, keep)
    dense = (x >= lo) & (x <= hi) & (True if keep is None else keep)
    levels = fit_levels(normalize(x, lo, hi)[dense], bits)  # calibrated on the dense entries only
    codes, out = nuq_quantize(x, lo, hi, levels)
    return torch.where(out, x.float(), nuq_dequantize(codes, lo, hi, levels)).to(x.dtype), out, levels


@dataclass
class KVQuant(Quantizer):
    """nuq`bits` KV cache keeping a fraction `outlier_frac` of each vector exact; keys quantized before RoPE.

    Args:
        bits: code width, 1..8 (the paper evaluates 2, 3 and 4).
        outlier_frac: fraction of each vector kept exact, in [0, 0.5) (paper: 0.01).
        n_sink: first tokens kept exact and out of calibration (paper: 1; 0 turns it off).
        rope_theta: RoPE base of the fallback used only when the model gives no rotary embedding
            (`Model.rope` is None): default (unscaled) RoPE, Llama-2's 1e4.

    RoPE: the store receives post-RoPE keys. It takes the model's own rotary embedding when the cache makes it
    (`Model.rope`: the model's theta and scaling type, llama3, yarn ..., and attention scaling); positions are `Step.positions` (each row's real tokens counted from 0). Keys
    are rotated back before quantizing and forward again after de-quantizing. The two rotations are exact
    inverses whatever cos/sin are, so positions that differ from those the model used (left padding without
    position_ids) or a wrong fallback theta only make keys quantize worse, never move a position. Variants
    whose frequencies change with the sequence length (dynamic NTK) re-rotate old keys with the current ones.
    """

    bits: int = 3
    outlier_frac: float = 0.01
    n_sink: int = 1
    rope_theta: float = 10000.0
    _rope: Optional[Callable] = field(default=None, init=False, repr=False, compare=False)


    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"KVQuant: bits must be an int in 1..8, got {self.bits!r}")
        if not (isinstance(self.outlier_frac, (int, float)) and 0 <= self.outlier_frac < 0.5):
            raise ValueError(f"KVQuant: outlier_frac must be in [0, 0.5), got {self.outlier_frac!r}")
        if not (isinstance(self.n_sink, int) and self.n_sink >= 0):
            raise ValueError(f"KVQuant: n_sink must be an int >= 0, got {self.n_sink!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"KVQuant: rope_theta must be a number > 1, got {self.rope_theta!r}")

    def new_layer(self, layer_idx: int, model: Model) -> QuantizedStore:
        bound = replace(self)
        bound._rope = model.rope  # the model's own rotary embedding, to undo and redo RoPE on keys
        return QuantizedStore(bound, model)

    def rotate(self, x: Tensor, positions: Tensor, inverse: bool) -> Tensor:
        """Apply (or undo) RoPE on keys x (B, H_kv, n, D) at positions (B, H_kv, n) (-1 = padding: any angle)."""
        B, H, n, D = x.shape
        pos = positions.clamp(min=0)
        if self._rope is not None:  # the model's own cos/sin (its theta, scaling type and attention scaling)
            cos, sin = (t.to(x.device).view(B, H, n, D) for t in self._rope(pos.reshape(B, H * n)))
        else:
            cos, sin = rope_cos_sin(pos, D, self.rope_theta)
        return apply_rope(x, cos, sin, inverse)

    def encode(self, k, v, step, state) -> dict:
        n = k.shape[2]  # the step's newest n tokens
        positions, valid = step.positions[..., -n:], step.valid[..., -n:, None]
        pre = self.rotate(k, positions, inverse=True)  # (B, H_kv, n, D) keys before RoPE
        sink = (positions < self.n_sink)[..., None]
        keep = valid & ~sink  # calibrate on real tokens, sinks excluded
        if "levels_k" not in state:  # calibrating pass: per-channel key ranges, then both level sets
            state["k_lo"], state["k_hi"] = dense_range(pre, self.outlier_frac, 2, keep)
            dense = keep & (pre >= state["k_lo"]) & (pre <= state["k_hi"])
            state["levels_k"] = fit_levels(normalize(pre, state["k_lo"], state["k_hi"])[dense], self.bits)
        v_lo, v_hi = dense_range(v, self.outlier_frac, 3, keep)  # values: per token, online
        if "levels_v" not in state:
            dense = keep & (v >= v_lo) & (v <= v_hi)
            state["levels_v"] = fit_levels(normalize(v, v_lo, v_hi)[dense], self.bits)
        kc, k_out = nuq_quantize(pre, state["k_lo"], state["k_hi"], state["levels_k"])
        vc, v_out = nuq_quantize(v, v_lo, v_hi, state["levels_v"])
        k_sparse, v_sparse = SparseRows(), SparseRows()  # outliers and sink tokens, exact
        k_sparse.add(pre, (k_out | sink) & valid)  # padding is never attended: not kept
        v_sparse.add(v, (v_out | sink) & valid)
        start = positions[:, :1, :1]  # positions are consecutive per row unless tokens were dropped before
        consecutive = bool((positions == start + torch.arange(n, device=k.device)).all())
        return dict(kc=pack(kc, self.bits), vc=pack(vc, self.bits), v_lo=v_lo, v_hi=v_hi, k_out=k_sparse,
                    v_out=v_sparse, pos=start.to(torch.int32) if consecutive else positions.to(torch.int32))

    def decode(self, b, dtype, state):
        D, n = state["k_lo"].shape[-1], b["kc"].shape[2]
        pre = b["k_out"].put(nuq_dequantize(unpack(b["kc"], self.bits, D), state["k_lo"], state["k_hi"], state["levels_k"]))
        vals = b["v_out"].put(nuq_dequantize(unpack(b["vc"], self.bits, D), b["v_lo"], b["v_hi"], state["levels_v"]))
        pos = b["pos"].long()
        if pos.shape[-1] == 1 and n > 1:
            pos = pos + torch.arange(n, device=pos.device)
        pos = pos.expand(pre.shape[:3])
        return self.rotate(pre, pos, inverse=False).to(dtype), vals.to(dtype)  # de-quantized, rotated again

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after T prompt tokens: packed codes, a range per key channel and per value
        token (in the cache's dtype), the sinks and each vector's 2 ceil(f n / 2) outliers exact (int32 index +
        a value in the cache's dtype). The layer's levels (2^b fp32 each for K and V) are left out."""
        T, D, cb, b, f = cache.tokens, cache.head_dim, cache.bits, self.bits, self.outlier_frac
        n = max(T - self.n_sink, 0)  # calibrated tokens; the sinks are kept exact instead
        sparse = D * 2 * math.ceil(f * n / 2) + n * 2 * math.ceil(f * D / 2) + 2 * (T - n) * D  # K, V, sinks
        held = 2 * T * 8 * math.ceil(D * b / 8) + 2 * D * cb + 2 * T * cb + sparse * (32 + cb)
        return cache.full_bits() / held

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["KVQuant"]:
        """The bits (8 down to 1) whose nominal ratio on `cache` is nearest `ratio`.

        On the benchmark's 16-bit cache (1.5k tokens, D = 64; the 1% per-token value outliers round up to 1 of
        64 per tail) 8 bits give 1.7x, 7 bits 1.9x, 4 bits 3.0x, 3 bits 3.7x, 2 bits 4.9x, 1 bit 7.0x: targets
        2 -> 7 bits, 4 -> 3, 8 -> 1. On fp32: 8 bits 3.2x, 6 bits 4.0x, 4 bits 5.4x, 3 bits 6.5x, 2 bits 8.2x.
        """
        return [cls(bits=b) for b in range(8, 0, -1)]
