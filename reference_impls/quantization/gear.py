"""GEAR: quantize most entries, then repair the error with a low-rank matrix and a sparse set of outliers.

Paper: Kang, Zhang, Kundu, Jeong, Liu, Krishna, Zhao, "GEAR: An Efficient KV Cache Compression Recipe for
Near-Lossless Generative Inference of LLM", arXiv 2403.05527, Section 3 and Algorithm 1: X ~ D + L + S with
S = Filter_s(X) (the top and bottom s/2 entries), D = Quant_b(X - S) and L = SVD_r(X - D - S), per head;
new tokens wait in a small full-precision streaming buffer and are compressed block by block.
Official code: https://github.com/opengear-project/GEAR
(`GenerationBench/GenerationTest/GEARLM/Simulated/compress_function.py`)
Deviations: (1) L is the exact truncated SVD of the residual (the best rank-r matrix) where the paper runs a
few power iterations that approximate it. (2) The backbone is KIVI-style group quantization (keys per
channel in groups of G tokens, values per token in groups of G channels), as in GEAR-KIVI. (3) One rank for
every block (the official scripts: rank 4 at prefill, 2 for decoding blocks). (4) Outliers are the
ceil(s n / 2) largest and smallest entries of each quantization vector: per channel (within the block) for
keys and per token for values, as in the official code, which counts int(s n / 2) per tail of each vector. As there, an outlier is replaced by its
vector's mean before quantizing; S holds X - D at the outliers (int32 index + value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from reference_impls.quantization.primitives import QuantizedTensor, SparseRows, dense_range
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["GEAR", "gear_decompose", "gear_reconstruct"]


def gear_decompose(x: Tensor, *, bits: int, group_size: int, dim: int, rank: int, outlier_frac: float):
    """x (B, H_kv, T, D) -> (q, outliers, S, A, Bt) with x ~ q.dequantize() + S + A @ Bt^T.

    q: QuantizedTensor of x with outliers filled (D); outliers: bool mask; S (B, H_kv, T, D): x - D at the
    outliers, 0 elsewhere; A (B, H_kv, T, r), Bt (B, H_kv, D, r): the rank-r SVD of the residual, per head.
    dim=2 groups along tokens (keys, per channel), dim=3 along channels (values, per token).
    """
    lo, hi = dense_range(x, outlier_frac, dim)
    out = (x < lo) | (x > hi)
    filled = torch.where(out, x.float().mean(dim, keepdim=True), x.float()).to(x.dtype)  # as the official code
    q = QuantizedTensor.from_float(filled, bits=bits, dim=dim, group_size=group_size)
    d_hat = q.dequantize()
    S = torch.where(out, x.float() - d_hat, 0.0)
    U, sv, Vh = torch.linalg.svd(x.float() - d_hat - S, full_matrices=False)  # per (row, head): (T, D) matrices
    r = min(rank, sv.shape[-1])
    return q, out, S, U[..., :r] * sv[..., None, :r], Vh[..., :r, :].transpose(-1, -2)


def gear_reconstruct(q: QuantizedTensor, S: Tensor, A: Tensor, Bt: Tensor) -> Tensor:
    """D + S + L (fp32)."""
    return q.dequantize() + S.float() + A.float() @ Bt.float().transpose(-1, -2)


@dataclass
class GEAR(Quantizer):
    """GEAR on a KIVI backbone: `bits`-bit codes, a rank-`rank` residual per head, `outlier_frac` sparse entries.

    Args:
        bits: 1, 2, 4 or 8 (official scripts: 2 with KIVI, 4 with KCVT).
        group_size: G, tokens per key group and channels per value group (official: 64).
        rank: r of the low-rank residual per head and block (official: 4 at prefill).
        outlier_frac: s, fraction of each vector kept sparse, in [0, 0.5) (official: 0.02).
        buffer_size: new tokens gathered in full precision before they are compressed (official: 64).
    """

    bits: int = 2
    group_size: int = 64
    rank: int = 4
    outlier_frac: float = 0.02
    buffer_size: int = 64


    def __post_init__(self):
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"GEAR: bits must be one of 1, 2, 4, 8, got {self.bits!r}")
        for f in ("group_size", "buffer_size"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                raise ValueError(f"GEAR: {f} must be an int >= 1, got {getattr(self, f)!r}")
        if not (isinstance(self.rank, int) and self.rank >= 0):
            raise ValueError(f"GEAR: rank must be an int >= 0, got {self.rank!r}")
        if not (isinstance(self.outlier_frac, (int, float)) and 0 <= self.outlier_frac < 0.5):
            raise ValueError(f"GEAR: outlier_frac must be in [0, 0.5), got {self.outlier_frac!r}")

    def flush(self, held_k, held_v, buffered, step):
        # the prompt is compressed at once, then every buffer_size new tokens
        n = buffered if step.compress or buffered >= self.buffer_size else 0
        return n, n

    def encode(self, k, v, step, state) -> dict:
        block = {}
        for name, x, dim in (("k", k, 2), ("v", v, 3)):
            q, out, S, A, Bt = gear_decompose(x, bits=self.bits, group_size=self.group_size, dim=dim, rank=self.rank,
                                              outlier_frac=self.outlier_frac)
            sparse = SparseRows()  # S: int32 index + value of each outlier
            sparse.add(S.to(x.dtype), out)
            block.update({name + "q": q, name + "A": A.to(x.dtype), name + "B": Bt.to(x.dtype), name + "S": sparse})
        return block

    def decode(self, block, dtype, state):
        def part(name):  # D + L, then + S at the outliers
            q, A, Bt = block[name + "q"], block[name + "A"], block[name + "B"]
            return block[name + "S"].put(q.dequantize() + A.float() @ Bt.float().transpose(-1, -2), add=True).to(dtype)
        return part("k"), part("v")

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after T prompt tokens (one block): packed codes, a scale and a zero per group
        (in the cache's dtype), the rank-r factors (T + D) r, and each vector's 2 ceil(s n / 2) outliers as an
        int32 index + a value in the cache's dtype; for keys and for values."""
        T, D, cb, G = cache.tokens, cache.head_dim, cache.bits, self.group_size
        codes = 2 * T * 8 * math.ceil(D * self.bits / 8)
        ranges = (math.ceil(T / G) * D + T * math.ceil(D / G)) * 2 * cb  # keys per channel, values per token
        lowrank = 2 * (T + D) * min(self.rank, T, D) * cb
        outliers = D * 2 * math.ceil(self.outlier_frac * T / 2) + T * 2 * math.ceil(self.outlier_frac * D / 2)
        return cache.full_bits() / (codes + ranges + lowrank + outliers * (32 + cb))

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["GEAR"]:
        """The bits (8, 4, 2, 1; G = 64, rank 4, s = 2%) whose nominal ratio on `cache` is nearest `ratio`.

        The rank-4 factors (~2 bits per element at D = 64 in fp32) and the outliers (per value token, 2% of 64
        rounds up to 1 per tail) cap GEAR's ratio: on the benchmark's 16-bit cache 8 bits give 1.5x, 4 bits
        2.4x, 2 bits 3.3x, 1 bit 4.2x, so targets 2 -> 4 bits, 4 -> 1, 8 -> 1 (4.2x, the nearest).
        On fp32: 2.5x, 3.7x, 4.8x, 5.6x.
        """
        return [cls(bits=b) for b in (8, 4, 2, 1)]
