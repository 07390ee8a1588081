"""KV quantization: methods that keep every token but store its keys and values in fewer bits."""

from reference_impls.quantization.flexgen import FlexGen
from reference_impls.quantization.fp8 import FP8
from reference_impls.quantization.kivi import KIVI
from reference_impls.quantization.primitives import (QuantizedTensor, choose_qparams, dequantize, pack, quantize,
                                                     unpack)

__all__ = ["FP8", "FlexGen", "KIVI", "QuantizedTensor", "choose_qparams", "dequantize", "pack", "quantize", "unpack"]
