"""FP8 KV cache: keys and values stored as 8-bit floats (E4M3 or E5M2) times one scale per tensor or per head.

Paper: Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433 (the E4M3 and E5M2 formats,
Section 2; E4M3 has no infinities and saturates at 448, E5M2 keeps IEEE infinities, max 57344). The KV-cache
use follows the serving engines: vLLM `--kv-cache-dtype fp8_e4m3 / fp8_e5m2` with per-tensor k/v scales
(docs "Quantized KV Cache"), SGLang `--kv-cache-dtype fp8_e4m3`, and transformers' `QuantizedCache(backend=
"fp8")` (`cache_utils.Fp8QuantizedLayer`: per-tensor scale amax / 448 frozen at the first update).
Official code: https://github.com/vllm-project/vllm (docs/features/quantization/quantized_kvcache.md);
https://github.com/huggingface/transformers (src/transformers/cache_utils.py)
Deviations: (1) the scales are calibrated on the first forward (the prefill's own keys and values: amax / max)
and then frozen, as transformers and vLLM's `calculate_kv_scales` do; vLLM's default is 1.0 without calibration
and its recommended path loads scales calibrated offline (llm-compressor). (2) Values outside the format's
range are saturated to +-max before the cast (a plain cast to E5M2 would give inf). (3) `granularity="head"`
keeps one scale per KV head (vLLM's per-attention-head scheme, k/v_scale = [num_kv_heads]); default per tensor.
(4) The current step's tokens attend at full precision (transformers attends to their FP8 round trip).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["FP8", "FP8_FORMATS", "fp8_dequantize", "fp8_quantize", "fp8_scale"]

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_scale(x: Tensor, fmt: str, per_head: bool) -> Tensor:
    """amax / format max, fp32: shape (1, 1, 1, 1) per tensor, (1, H_kv, 1, 1) per head, for x (B, H_kv, T, D)."""
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)
    amax = x.float().abs().amax(dim=dims, keepdim=True)
    return (amax / torch.finfo(FP8_FORMATS[fmt]).max).clamp(min=torch.finfo(torch.float32).tiny)  # all-zero x


def fp8_quantize(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """x / scale, saturated to the format's range, cast to FP8 (round to nearest even): 1 byte per element."""
    top = torch.finfo(FP8_FORMATS[fmt]).max
    return (x.float() / scale).clamp(-top, top).to(FP8_FORMATS[fmt])


def fp8_dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale).to(dtype)


@dataclass
class FP8(Quantizer):
    """FP8 KV cache with a frozen scale.

    Args:
        fmt: "e4m3" (3 mantissa bits, max 448; the usual choice) or "e5m2" (2 mantissa bits, max 57344).
        granularity: "tensor" (one scale for K and one for V per layer) or "head" (one per KV head).
    """

    fmt: str = "e4m3"
    granularity: str = "tensor"


    def __post_init__(self):
        if self.fmt not in FP8_FORMATS:
            raise ValueError(f"FP8: fmt must be one of {sorted(FP8_FORMATS)}, got {self.fmt!r}")
        if self.granularity not in ("tensor", "head"):
            raise ValueError(f"FP8: granularity must be 'tensor' or 'head', got {self.granularity!r}")

    def encode(self, k, v, step, state) -> dict:
        per_head = self.granularity == "head"
        if "k_scale" not in state:  # calibrate once, on the first tokens (the prefill), then freeze
            state["k_scale"], state["v_scale"] = fp8_scale(k, self.fmt, per_head), fp8_scale(v, self.fmt, per_head)
        return {"k": fp8_quantize(k, state["k_scale"], self.fmt), "v": fp8_quantize(v, state["v_scale"], self.fmt)}

    def decode(self, block, dtype, state):
        return fp8_dequantize(block["k"], state["k_scale"], dtype), fp8_dequantize(block["v"], state["v_scale"], dtype)

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held: one byte per element (the fp32 scales are a few bytes per layer)."""
        return cache.bits / 8

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["FP8"]:
        """E4M3 per tensor, the only candidate, whatever the target: 2x on the benchmark's 16-bit cache, 4x on
        fp32 (the achieved ratio is reported; targets 2, 4 and 8 all give this configuration)."""
        return [cls()]
