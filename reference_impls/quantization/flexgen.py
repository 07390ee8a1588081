"""FlexGen-style KV quantization: every token's keys and values in b-bit groups along the head dim.

Paper: Sheng, Zheng, Yuan, Li, Ryabinin, Chen, Liang, Ré, Stoica, Zhang, "FlexGen: High-Throughput Generative
Inference of Large Language Models with a Single GPU", arXiv 2303.06865 (ICML 2023), Section 5
("Approximate Methods": group-wise asymmetric min-max quantization of weights and KV cache to 4 bits).
Official code: https://github.com/FMInference/FlexLLMGen (`flexllmgen/compression.py`; the cache config is
4 bits, groups of 64 along the head dim, asymmetric).
Deviations: (1) default groups of 32, as the benchmark seed ran it (arXiv 2407.01527, KIVI's authors);
FlexGen's own default is 64 (`FlexGen(group_size=64)`). (2) Codes are packed into uint8 and attention reads
them de-quantized (the seed only simulated the quantization; the bytes here are real). (3) Scale and zero
are stored in the cache's dtype (FlexGen: fp16).

No full-precision window: unlike KIVI, every token is quantized right after the attention that first used
it (the prefill attends at full precision, as in FlexGen's `mha`; a decoded token attends to itself exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from torch import Tensor

from reference_impls.quantization.primitives import QuantizedTensor
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["FlexGen", "flexgen_quantize"]


def flexgen_quantize(x: Tensor, *, bits: int, group_size: int) -> QuantizedTensor:
    """x (B, H_kv, T, D) -> per-token codes, groups of `group_size` channels (scale (B, H_kv, T, ceil(D/G)))."""
    return QuantizedTensor.from_float(x, bits=bits, dim=3, group_size=group_size)


@dataclass
class FlexGen(Quantizer):
    """Group-wise asymmetric min-max KV quantization, keys and values per token.

    Args:
        bits: 1, 2, 4 or 8 (FlexGen uses 4).
        group_size: channels per group along the head dim (seed: 32; FlexGen: 64).
    """

    bits: int = 4
    group_size: int = 32


    def __post_init__(self):
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"FlexGen: bits must be one of 1, 2, 4, 8, got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"FlexGen: group_size must be an int >= 1, got {self.group_size!r}")

    def encode(self, k, v, step, state) -> dict:
        return {"k": flexgen_quantize(k, bits=self.bits, group_size=self.group_size),
                "v": flexgen_quantize(v, bits=self.bits, group_size=self.group_size)}

    def decode(self, block, dtype, state):
        return block["k"].dequantize(dtype), block["v"].dequantize(dtype)

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held: per token, packed codes and a scale and a zero per group (in the cache's
        dtype), the same for keys and values; every prompt token is quantized."""
        D, cb = cache.head_dim, cache.bits
        return D * cb / (8 * math.ceil(D * self.bits / 8) + math.ceil(D / self.group_size) * 2 * cb)

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["FlexGen"]:
        """The bits (8, 4, 2, 1) and group size (64, 32, 16) whose nominal ratio on `cache` is nearest `ratio`.

        Nominal ratio D cb / (b D + 2 cb D / G): on the benchmark's 16-bit cache 16 / (b + 32 / G), so targets
        2 -> 8 bits G = 64 (1.9x), 4 -> 2 bits G = 16 (4x), 8 -> 1 bit G = 32 (8x); on fp32 (32 / (b + 64 / G))
        2 -> 8 bits G = 16 (2.7x), 4 -> 4 bits G = 16 (4x), 8 -> 2 bits G = 32 (8x).
        """
        return [cls(bits=b, group_size=g) for b in (8, 4, 2, 1) for g in (16, 32, 64)]
