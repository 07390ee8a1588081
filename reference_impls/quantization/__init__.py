"""KV quantization: methods that keep every token but store its keys and values in fewer bits."""

from reference_impls.quantization.flexgen import FlexGen
from reference_impls.quantization.fp8 import FP8
from reference_impls.quantization.gear import GEAR
from reference_impls.quantization.kivi import KIVI
from reference_impls.quantization.kvquant import KVQuant
from reference_impls.quantization.polarquant import PolarQuant
from reference_impls.quantization.primitives import (QuantizedTensor, SparseRows, choose_qparams, dense_range,
                                                     dequantize, pack, pack_fields, quantize, unpack,
                                                     unpack_fields)
from reference_impls.quantization.qjl import QJL
from reference_impls.quantization.turboquant import TurboQuant
from reference_impls.quantization.zipcache import ZipCache

__all__ = ["FP8", "FlexGen", "GEAR", "KIVI", "KVQuant", "PolarQuant", "QJL", "TurboQuant", "ZipCache",
           "QuantizedTensor", "SparseRows", "choose_qparams", "dense_range", "dequantize", "pack", "pack_fields",
           "quantize", "unpack", "unpack_fields"]
