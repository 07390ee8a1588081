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
undone with the model's own rotary embedding (`Step.rope`), or rebuilt from `rope_theta` when the model
gives none (see `KVQuant`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import KVMethod, LayerStore, Step
from reference_impls.quantization.primitives import SparseRows, dense_range, pack, unpack
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec, closest

__all__ = ["KVQuant", "KVQuantStore", "apply_rope", "fit_levels", "kvquant_fake", "normalize", "nuq_dequantize",
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


class KVQuantStore(LayerStore):
    """Packed nuqX codes of pre-RoPE keys and of values, their ranges, the layer's levels, sparse outliers."""

    def __init__(self, method: "KVQuant"):
        self.m = method
        self.kc = self.vc = None  # (B, H_kv, T, ceil(D bits / 8)) uint8 codes, packed along D
        self.k_lo = self.k_hi = None  # (B, H_kv, 1, D) per-channel key range, fixed by the calibrating pass
        self.v_lo = self.v_hi = None  # (B, H_kv, T, 1) per-token value range, computed online
        self.levels_k = self.levels_v = None  # (2^bits,) fp32, this layer's nuqX datatypes
        self.k_out, self.v_out = SparseRows(), SparseRows()  # outliers and sink tokens, exact
        self.offset: Optional[Tensor] = None  # (B,) slot - position (left padding): rebuilds positions
        # the model's rotary embedding, kept from the compressing step: append() (decoding) gets no Step
        self.rope: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]] = None
        self.k: Optional[Tensor] = None  # (B, H_kv, q, D) post-RoPE keys not quantized yet
        self.v: Optional[Tensor] = None

    def rotate(self, x: Tensor, start: int, inverse: bool) -> Tensor:
        """Apply (or undo) RoPE on keys x (B, H_kv, n, D) held at slots start .. start + n - 1."""
        slots = torch.arange(start, start + x.shape[2], device=x.device)
        positions = slots - self.offset[:, None]  # (B, n): each row's real tokens count from 0
        if self.rope is not None:  # the model's own cos/sin (its theta, scaling type and attention scaling)
            cos, sin = (t[:, None].to(x.device) for t in self.rope(positions))  # (B, 1, n, D)
        else:
            cos, sin = rope_cos_sin(positions[:, None], x.shape[-1], self.m.rope_theta)
        return apply_rope(x, cos, sin, inverse)

    def append(self, k: Tensor, v: Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        if self.kc is None:
            return self.k, self.v, None
        D, b = k.shape[-1], self.m.bits
        pre = self.k_out.put(nuq_dequantize(unpack(self.kc, b, D), self.k_lo, self.k_hi, self.levels_k))
        vals = self.v_out.put(nuq_dequantize(unpack(self.vc, b, D), self.v_lo, self.v_hi, self.levels_v))
        keys = self.rotate(pre, 0, inverse=False).to(k.dtype)  # de-quantized pre-RoPE keys, rotated again
        return torch.cat([keys, self.k], dim=2), torch.cat([vals.to(v.dtype), self.v], dim=2), None

    def after_attention(self, step: Step) -> None:
        m = self.m
        if self.levels_k is None and not step.compress:
            return  # nothing calibrated yet: stay in full precision until the compressing pass
        if self.offset is None:
            self.offset = step.token_slots()[:, 0, -1] - step.token_positions()[:, 0, -1]
            self.rope = step.rope
        t0, n = 0 if self.kc is None else self.kc.shape[2], self.k.shape[2]
        pre = self.rotate(self.k, t0, inverse=True)  # (B, H_kv, n, D) keys before RoPE
        sink = (torch.arange(t0, t0 + n, device=pre.device) - self.offset[:, None] < m.n_sink)[:, None, :, None]
        valid = step.valid[:, :, -n:, None]
        keep = valid & ~sink  # calibrate on real tokens, sinks excluded
        if self.levels_k is None:  # calibrating pass: per-channel key ranges, then both level sets
            self.k_lo, self.k_hi = dense_range(pre, m.outlier_frac, 2, keep)
            dense = keep & (pre >= self.k_lo) & (pre <= self.k_hi)
            self.levels_k = fit_levels(normalize(pre, self.k_lo, self.k_hi)[dense], m.bits)
        v_lo, v_hi = dense_range(self.v, m.outlier_frac, 3, keep)  # values: per token, online
        if self.levels_v is None:
            dense = keep & (self.v >= v_lo) & (self.v <= v_hi)
            self.levels_v = fit_levels(normalize(self.v, v_lo, v_hi)[dense], m.bits)
        kc, k_out = nuq_quantize(pre, self.k_lo, self.k_hi, self.levels_k)
        vc, v_out = nuq_quantize(self.v, v_lo, v_hi, self.levels_v)
        self.k_out.add(pre, (k_out | sink) & valid)  # padding is never attended: not kept
        self.v_out.add(self.v, (v_out | sink) & valid)
        cat = lambda old, new: new if old is None else torch.cat([old, new], dim=2)  # noqa: E731
        self.kc, self.vc = cat(self.kc, pack(kc, m.bits)), cat(self.vc, pack(vc, m.bits))
        self.v_lo, self.v_hi = cat(self.v_lo, v_lo), cat(self.v_hi, v_hi)
        self.k = self.v = None

    def nbytes(self) -> int:
        held = (self.kc, self.vc, self.k_lo, self.k_hi, self.v_lo, self.v_hi, self.levels_k, self.levels_v,
                self.offset, self.k, self.v)
        return sum(t.nbytes for t in held if t is not None) + self.k_out.nbytes() + self.v_out.nbytes()


@dataclass
class KVQuant(KVMethod):
    """nuq`bits` KV cache keeping a fraction `outlier_frac` of each vector exact; keys quantized before RoPE.

    Args:
        bits: code width, 1..8 (the paper evaluates 2, 3 and 4).
        outlier_frac: fraction of each vector kept exact, in [0, 0.5) (paper: 0.01).
        n_sink: first tokens kept exact and out of calibration (paper: 1; 0 turns it off).
        rope_theta: RoPE base of the fallback used only when the model gives no rotary embedding
            (`Step.rope` is None): default (unscaled) RoPE, Llama-2's 1e4.

    RoPE: the store receives post-RoPE keys. It takes the model's own rotary embedding from the compressing
    step (`Step.rope`: the model's theta and scaling type, llama3, yarn ..., and attention scaling) and keeps
    it for decoding; positions are `Step.token_positions()` (each row's real tokens counted from 0). Keys
    are rotated back before quantizing and forward again after de-quantizing. The two rotations are exact
    inverses whatever cos/sin are, so positions that differ from those the model used (left padding without
    position_ids) or a wrong fallback theta only make keys quantize worse, never move a position. Variants
    whose frequencies change with the sequence length (dynamic NTK) re-rotate old keys with the current ones.
    """

    bits: int = 3
    outlier_frac: float = 0.01
    n_sink: int = 1
    rope_theta: float = 10000.0

    name = "kvquant"

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"KVQuant: bits must be an int in 1..8, got {self.bits!r}")
        if not (isinstance(self.outlier_frac, (int, float)) and 0 <= self.outlier_frac < 0.5):
            raise ValueError(f"KVQuant: outlier_frac must be in [0, 0.5), got {self.outlier_frac!r}")
        if not (isinstance(self.n_sink, int) and self.n_sink >= 0):
            raise ValueError(f"KVQuant: n_sink must be an int >= 0, got {self.n_sink!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"KVQuant: rope_theta must be a number > 1, got {self.rope_theta!r}")

    def new_layer(self, layer_idx: int, num_layers: int) -> KVQuantStore:
        return KVQuantStore(self)

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
    def from_ratio(cls, ratio: float, cache: CacheSpec = EMBEDDED) -> "KVQuant":
        """The bits (8 down to 1) whose nominal ratio on `cache` is nearest `ratio`.

        On the benchmark's fp32 cache (1.5k tokens, D = 64; the 1% per-token value outliers round up to 1 of
        64 per tail) 8 bits give 3.2x, 6 bits 4.0x, 4 bits 5.4x, 3 bits 6.5x, 2 bits 8.2x: targets 2 -> 8 bits,
        4 -> 6, 8 -> 2. On fp16: 8 bits 1.7x, 4 bits 3.0x, 3 bits 3.7x, 2 bits 4.9x, 1 bit 7.0x.
        """
        return closest(ratio, [cls(bits=b) for b in range(8, 0, -1)], cache, "KVQuant")
