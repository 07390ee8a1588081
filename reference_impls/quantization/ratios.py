"""From a target compression ratio to a quantization configuration, against the cache the model really holds.

A quantizer's ratio (full-cache bytes / bytes held) depends on the cache it compresses, which `from_ratio`
cannot see: the cache's dtype (full bytes, and the scales and zeros, stored in that dtype), the head dim D
(per-token ranges and outliers weigh 1/D) and the prompt length T (full-precision windows weigh more on short
prompts). `CacheSpec` states those assumptions; `EMBEDDED` is the benchmark's: the embedded SmolLM2-135M in
bf16 (D = 64) on ~1.5k-token prompts, so targets are in the seeds' unit, a 16-bit cache (arXiv 2407.01527:
nominal size = fp16 size / r). Against fp32 (`FP32`, the unit of the atlas's first evidence files), b-bit
codes with fp32 scales shrink the cache about twice as much (KIVI-4: ~4.2x against fp32, ~2.8x against 16 bits),
which is why a ratio is meaningless without its unit.

Each method's `nominal_ratio(cache)` counts the bytes its store holds after compressing T prompt tokens
(codes, scales, windows, outliers at their nominal count; a test checks it against the bytes measured on a
store) and `from_ratio(r, cache=...)` returns the candidate whose nominal ratio is nearest r on a log scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TypeVar

__all__ = ["CacheSpec", "EMBEDDED", "FP32", "closest"]

M = TypeVar("M")


@dataclass(frozen=True)
class CacheSpec:
    """The cache a configuration is chosen for.

    Args:
        bits: bits per element of the full cache (32 for fp32, 16 for fp16/bf16).
        head_dim: D.
        tokens: T, prompt tokens compressed.
    """

    bits: int = 16
    head_dim: int = 64
    tokens: int = 1500

    def __post_init__(self):
        if self.bits not in (8, 16, 32):
            raise ValueError(f"CacheSpec: bits must be one of 8, 16, 32, got {self.bits!r}")
        for f in ("head_dim", "tokens"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                raise ValueError(f"CacheSpec: {f} must be an int >= 1, got {getattr(self, f)!r}")

    def full_bits(self) -> int:
        """Bits of one (batch row, KV head) of the full cache: keys and values, T x D each."""
        return 2 * self.tokens * self.head_dim * self.bits


#: the benchmark's cache: SmolLM2-135M-Instruct in bf16 (the seeds' 16-bit unit), head dim 64, ~1.5k-token prompts
EMBEDDED = CacheSpec()
#: the same cache in fp32, the unit of the per-method evidence files made before the benchmark moved to 16 bits
FP32 = CacheSpec(bits=32)


def closest(ratio: float, candidates: Sequence[M], cache: CacheSpec, name: str) -> M:
    """The candidate whose `nominal_ratio(cache)` is nearest `ratio` on a log scale (4x is as far from 2x as
    from 8x); the first one on a tie, so list candidates from the most accurate down."""
    if not (isinstance(ratio, (int, float)) and ratio >= 1):
        raise ValueError(f"{name}: ratio must be a number >= 1, got {ratio!r}")
    return min(candidates, key=lambda c: abs(math.log(c.nominal_ratio(cache) / ratio)))
