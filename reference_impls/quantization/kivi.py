"""KIVI: keys quantized per channel, values per token, the most recent tokens kept in full precision.

Paper: Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache", arXiv 2402.02750 (ICML 2024): Section 3 (key outliers sit in fixed channels, so keys are
grouped per channel and values per token), Eq. (1)-(2) (asymmetric min-max), Algorithm 1 (grouping and the
full-precision residual).
Official code: https://github.com/jy-yuan/KIVI (`models/llama_kivi.py`, `quant/new_pack.py`)
Deviations: (1) codes are packed into uint8 (8 / bits per byte) where the official code packs int32; the
bytes are the same. (2) The quantized part is de-quantized to the model's dtype and attention runs on it
(simulated in the arithmetic, real in storage); the official code multiplies packed codes directly
(`kivi_triton.py` here does the same). (3) residual_length=0 is allowed: keys then still wait for a whole
group of `group_size` tokens, values are quantized at once. (4) Value groups need not divide D (the last
group is shorter); the official code asserts D % group_size == 0. (5) Left-padding tokens join the key
groups of a batch (the official code has no padding).

How the residual is flushed, as in the official code: keys are quantized in whole blocks of R tokens from
the start of the stream (prefill: all but the T mod R newest; decoding: when R keys have piled up), so the
key groups of G tokens (G divides R) never straddle a flush; values are quantized one token at a time as
they leave the window of the R newest. Either way the cache after T tokens depends only on those T tokens
(not on how they arrived), which is what `kivi_quantize` computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from reference_impls.base import Step
from reference_impls.quantization.primitives import QuantizedTensor
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["KIVI", "kivi_quantize", "kivi_split"]


def kivi_split(T: int, *, group_size: int, residual_length: int) -> tuple[int, int]:
    """How many of T tokens are quantized: (keys, values). The rest, the newest, stay in full precision."""
    block = residual_length or group_size  # keys move out of the window in blocks of R (G when R = 0)
    return T - T % block, max(T - residual_length, 0)


def kivi_quantize(k: Tensor, v: Tensor, *, bits: int, group_size: int, residual_length: int,
                  ) -> tuple[Optional[QuantizedTensor], Tensor, Optional[QuantizedTensor], Tensor]:
    """KIVI's cache of T tokens: (k_quant, k_full, v_quant, v_full).

    k, v (B, H_kv, T, D). Keys: per channel, groups of G tokens along T (dim 2) -> scale (B, H_kv, n/G, D).
    Values: per token, groups of G channels along D (dim 3) -> scale (B, H_kv, n, ceil(D/G)).
    Full-precision parts: the T mod R newest keys and the min(T, R) newest values.
    """
    nk, nv = kivi_split(k.shape[2], group_size=group_size, residual_length=residual_length)
    kq = QuantizedTensor.from_float(k[:, :, :nk], bits=bits, dim=2, group_size=group_size) if nk else None
    vq = QuantizedTensor.from_float(v[:, :, :nv], bits=bits, dim=3, group_size=group_size) if nv else None
    return kq, k[:, :, nk:], vq, v[:, :, nv:]


@dataclass
class KIVI(Quantizer):
    """KIVI-`bits`: asymmetric min-max, keys per channel and values per token, groups of G, window of R.

    Args:
        bits: 1, 2, 4 or 8 (the paper evaluates 2 and 4).
        group_size: G, tokens per key group and channels per value group (paper: 32).
        residual_length: R, newest tokens kept in full precision; a multiple of G (paper: 128).
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128


    def __post_init__(self):
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"KIVI: bits must be one of 1, 2, 4, 8, got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"KIVI: group_size must be an int >= 1, got {self.group_size!r}")
        if not (isinstance(self.residual_length, int) and self.residual_length >= 0
                and self.residual_length % self.group_size == 0):
            raise ValueError(f"KIVI: residual_length must be an int >= 0 and a multiple of group_size "
                             f"({self.group_size}), got {self.residual_length!r}")

    def flush(self, held_k: int, held_v: int, buffered: int, step: Step) -> tuple[int, int]:
        # what left the window: the same split as kivi_quantize over the whole stream
        nk, nv = kivi_split(held_k + buffered, group_size=self.group_size, residual_length=self.residual_length)
        return nk - held_k, nv - held_v

    def encode(self, k, v, step, state) -> dict:
        return {"k": None if k is None else QuantizedTensor.from_float(k, bits=self.bits, dim=2, group_size=self.group_size),
                "v": None if v is None else QuantizedTensor.from_float(v, bits=self.bits, dim=3, group_size=self.group_size)}

    def decode(self, block, dtype, state):
        return tuple(None if block[x] is None else block[x].dequantize(dtype) for x in ("k", "v"))

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / the bytes held after T prompt tokens: packed codes, a scale and a zero per group of G
        (in the cache's dtype), the T mod R newest keys and the min(T, R) newest values in full precision."""
        T, D, cb, b, G = cache.tokens, cache.head_dim, cache.bits, self.bits, self.group_size
        nk, nv = kivi_split(T, group_size=G, residual_length=self.residual_length)
        codes = 8 * math.ceil(D * b / 8)  # per token, packed along D
        keys = nk * codes + nk // G * D * 2 * cb + (T - nk) * D * cb
        values = nv * (codes + math.ceil(D / G) * 2 * cb) + (T - nv) * D * cb
        return cache.full_bits() / (keys + values)

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["KIVI"]:
        """The bits (8, 4, 2, 1; G = 32, R = 128) whose nominal ratio on `cache` is nearest `ratio`.

        On the benchmark's 16-bit cache (bf16, 1.5k tokens, D = 64) the nominal ratios are 8 bits 1.7x, 4 bits
        2.8x, 2 bits 4.0x, 1 bit 5.3x (the window of R full-precision tokens caps them): targets 2 -> 8 bits,
        4 -> 2, 8 -> 1. Against fp32 (`FP32`, the first evidence files' unit): 2.8x, 4.1x, 5.3x, 6.2x.
        """
        return [cls(bits=b) for b in (8, 4, 2, 1)]
