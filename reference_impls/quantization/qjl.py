"""QJL: a key is kept as the signs of a random Gaussian projection plus its norm; scores are estimated unbiasedly.

Paper: Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead",
arXiv 2406.03482 (AAAI 2025): the QJL map k -> sign(S k), S in R^{m x d} with i.i.d. N(0, 1) entries; the
asymmetric estimator <q, k> ~ sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>, unbiased, with distortion shrinking
as m grows; outlier key channels sketched by a separate QJL; values quantized per token.
Official code: https://github.com/amirzandieh/QJL (`models/llama3_utils_qjl.py`,
`qjl_kernel/csrc/qjl_gqa_score_kernel.cu`)
Deviations: (1) attention reads de-quantized keys k_hat = sqrt(pi/2) / m * ||k|| * S^T sign(S k), for which
<q, k_hat> IS the paper's estimator (the same number, multiplied in another order). (2) S has i.i.d. Gaussian
rows as in the paper's analysis; the official code orthogonalizes them (QR) by default. The official run
sketches the outlier channels with as many bits as the inliers (m_out = m = 256 for d = 128, our default
m_out = m) and uses 512 / 128 bits in its first 15 layers; here every layer has the same sketch. (3) One rule for keys and values: tokens are quantized in whole blocks of
`buffer_size`, the newest T mod buffer_size stay in full precision (the official code does this for keys
and keeps exactly the newest buffer_size values). (4) S (m x D, shared by all layers, regenerated from
`seed`) is not counted in nbytes, like a weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from reference_impls.quantization.primitives import QuantizedTensor, pack, unpack
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["QJL", "outlier_channels", "qjl_dequantize", "qjl_projection", "qjl_quantize", "qjl_scores"]


def qjl_projection(dim: int, sketch_dim: int, seed: int) -> Tensor:
    """S (sketch_dim, dim), i.i.d. N(0, 1), fp32, the same for a given seed on every machine."""
    return torch.randn(sketch_dim, dim, generator=torch.Generator().manual_seed(seed))


def qjl_quantize(k: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """k (..., D) -> (signs (..., m) bool, True for +1, i.e. S k > 0; norms (...,) fp32)."""
    return k.float() @ S.T.to(k.device) > 0, k.float().norm(dim=-1)


def qjl_dequantize(signs: Tensor, norms: Tensor, S: Tensor) -> Tensor:
    """k_hat (..., D) = sqrt(pi/2) / m * ||k|| * S^T sign(S k): <q, k_hat> is the estimator of <q, k>."""
    pm = signs.float() * 2 - 1
    return math.sqrt(math.pi / 2) / S.shape[0] * norms[..., None] * (pm @ S.to(signs.device))


def qjl_scores(q: Tensor, signs: Tensor, norms: Tensor, S: Tensor) -> Tensor:
    """The paper's estimator as written, q (..., n, D) against (..., T, m) signs -> (..., n, T)."""
    sq = q.float() @ S.T.to(q.device)  # the query is projected, never quantized
    return math.sqrt(math.pi / 2) / S.shape[0] * norms[..., None, :] * (sq @ (signs.float() * 2 - 1).transpose(-1, -2))


def outlier_channels(k: Tensor, n_outliers: int, group_size: int) -> Tensor:
    """Per group of `group_size` tokens, the n_outliers channels of largest L2 norm -> (B, H, T / G, n) int64."""
    B, H, T, D = k.shape
    return k.float().reshape(B, H, T // group_size, group_size, D).norm(dim=3).topk(n_outliers, dim=-1).indices


@dataclass
class QJL(Quantizer):
    """QJL keys (1-bit sketches of size m + m_out per token, two norms) and `value_bits` per-token values.

    Args:
        sketch_dim: m, sign bits per key for the inlier channels, a multiple of 8 (official: 256 for d = 128).
        outlier_sketch_dim: bits per key for the outlier channels, a multiple of 8, <= sketch_dim.
        n_outliers: outlier channels per group of tokens (official: 8 of 128), in [0, D).
        group_size: G, tokens per outlier group and channels per value group (official: 32).
        value_bits: 1, 2, 4 or 8 (official: 2).
        buffer_size: tokens quantized together; the newest T mod buffer_size stay full (official: 128).
        seed: of the projection S.
    """

    sketch_dim: int = 128
    outlier_sketch_dim: int = 128
    n_outliers: int = 4
    group_size: int = 32
    value_bits: int = 2
    buffer_size: int = 128
    seed: int = 42


    def __post_init__(self):
        for f in ("sketch_dim", "outlier_sketch_dim"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 8 and getattr(self, f) % 8 == 0):
                raise ValueError(f"QJL: {f} must be a positive multiple of 8, got {getattr(self, f)!r}")
        if self.outlier_sketch_dim > self.sketch_dim:
            raise ValueError(f"QJL: outlier_sketch_dim must be <= sketch_dim ({self.sketch_dim}), got "
                             f"{self.outlier_sketch_dim!r}")
        if not (isinstance(self.n_outliers, int) and self.n_outliers >= 0):
            raise ValueError(f"QJL: n_outliers must be an int >= 0, got {self.n_outliers!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"QJL: group_size must be an int >= 1, got {self.group_size!r}")
        if self.value_bits not in (1, 2, 4, 8):
            raise ValueError(f"QJL: value_bits must be one of 1, 2, 4, 8, got {self.value_bits!r}")
        if not (isinstance(self.buffer_size, int) and self.buffer_size >= 1
                and self.buffer_size % self.group_size == 0):
            raise ValueError(f"QJL: buffer_size must be a positive multiple of group_size ({self.group_size}), "
                             f"got {self.buffer_size!r}")

    def projections(self, dim: int, device) -> tuple[Tensor, Tensor]:
        """(S, S_out): S (m, D) and its first m_out rows, which sketch the outlier channels (as the kernel does)."""
        if not self.n_outliers < dim:
            raise ValueError(f"QJL: n_outliers must be < head dim {dim}, got {self.n_outliers}")
        S = qjl_projection(dim, self.sketch_dim, self.seed).to(device)
        return S, S[: self.outlier_sketch_dim]

    def flush(self, held_k, held_v, buffered, step):
        n = buffered - buffered % self.buffer_size  # whole buffers; the newest T mod buffer_size stay full
        return n, n

    def encode(self, k, v, step, state) -> dict:
        S, S_out = self.projections(k.shape[-1], k.device)
        idx = outlier_channels(k, self.n_outliers, self.group_size)
        out = torch.zeros_like(k, dtype=torch.bool).reshape(*idx.shape[:3], self.group_size, -1)
        out = out.scatter_(-1, idx[:, :, :, None].expand(-1, -1, -1, self.group_size, -1), True).flatten(2, 3)
        s_in, n_in = qjl_quantize(k.masked_fill(out, 0), S)  # inlier channels only
        s_out, n_out = qjl_quantize(k.masked_fill(~out, 0), S_out)  # outlier channels, their own sketch
        return dict(sign_in=pack(s_in.to(torch.uint8), 1), sign_out=pack(s_out.to(torch.uint8), 1),
                    norm_in=n_in.to(k.dtype), norm_out=n_out.to(k.dtype), idx=idx.to(torch.uint8),
                    v=QuantizedTensor.from_float(v, bits=self.value_bits, dim=3, group_size=self.group_size))

    def decode(self, b, dtype, state):
        S, S_out = self.projections(b["v"].shape[-1], b["idx"].device)
        out = torch.zeros(*b["idx"].shape[:3], S.shape[1], device=S.device).scatter_(-1, b["idx"].long(), 1.0)
        out = out.repeat_interleave(self.group_size, dim=2)  # (B, H, T, D) 1 on the group's outlier channels
        inl = qjl_dequantize(unpack(b["sign_in"], 1, S.shape[0]).bool(), b["norm_in"].float(), S)
        outl = qjl_dequantize(unpack(b["sign_out"], 1, S_out.shape[0]).bool(), b["norm_out"].float(), S_out)
        keys = inl * (1 - out) + outl * out  # each estimator sees only its own channels, as in the kernel
        return keys.to(dtype), b["v"].dequantize(dtype)

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after T prompt tokens: per quantized key m + m_out sign bits and two norms (in
        the cache's dtype) and n_outliers uint8 channel ids per group of G tokens; per quantized value packed
        codes and a scale and a zero per group of G channels; the T mod buffer_size newest tokens in full."""
        T, D, cb = cache.tokens, cache.head_dim, cache.bits
        n = T - T % self.buffer_size
        keys = n * (self.sketch_dim + self.outlier_sketch_dim + 2 * cb) + n // self.group_size * self.n_outliers * 8
        values = n * (8 * math.ceil(D * self.value_bits / 8) + math.ceil(D / self.group_size) * 2 * cb)
        return cache.full_bits() / (keys + values + 2 * (T - n) * D * cb)

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["QJL"]:
        """A ladder of b-bit values (8, 4, 2, 1) with a key sketch of the same width, m = m_out = b D sign bits
        per key (the official run is the b = 2 rung: m = m_out = 256 for D = 128). On the benchmark's 16-bit cache (D = 64, 1.5k tokens, 92 of them
        in the full-precision buffer) b = 8 gives 1.2x, 4 -> 2.2x, 2 -> 3.5x, 1 -> 5.2x: targets 2 -> 4, 4 -> 2,
        8 -> 1. On fp32: 2.5x, 4.0x, 5.6x, 7.0x.
        """
        D = cache.head_dim
        return [cls(sketch_dim=b * D, outlier_sketch_dim=b * D, value_bits=b) for b in (8, 4, 2, 1)
                if b * D % 8 == 0]  # a whole number of bytes
