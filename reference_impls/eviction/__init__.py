"""Token eviction: methods that drop whole tokens' keys and values."""

from reference_impls.eviction.base import EvictingStore, EvictionMethod, keep_top
from reference_impls.eviction.streamingllm import StreamingLLM
from reference_impls.eviction.snapkv import SnapKV
from reference_impls.eviction.pyramidkv import PyramidKV
from reference_impls.eviction.adakv import AdaKV
from reference_impls.eviction.keydiff import KeyDiff
from reference_impls.eviction.h2o import H2O
from reference_impls.eviction.tova import TOVA
from reference_impls.eviction.knorm import KNorm
from reference_impls.eviction.random import RandomEviction
from reference_impls.eviction.keyformer import Keyformer
from reference_impls.eviction.scissorhands import Scissorhands
from reference_impls.eviction.fastgen import FastGen
from reference_impls.eviction.expected_attention import ExpectedAttention
from reference_impls.eviction.lagkv import LagKV
from reference_impls.eviction.criticalkv import CriticalKV
from reference_impls.eviction.chunkkv import ChunkKV
from reference_impls.eviction.cake import CAKE
from reference_impls.eviction.simlayerkv import SimLayerKV
from reference_impls.eviction.kvzip import KVzip
from reference_impls.eviction.squeezeattention import SqueezeAttention

__all__ = ["EvictingStore", "EvictionMethod", "StreamingLLM", "keep_top"]
__all__ += ["AdaKV", "KeyDiff", "PyramidKV", "SnapKV"]
__all__ += ["H2O", "KNorm", "RandomEviction", "TOVA"]
__all__ += ["Scissorhands"]
__all__ += ["Keyformer"]
__all__ += ["FastGen"]
__all__ += ["CriticalKV", "ExpectedAttention", "LagKV"]
__all__ += ["CAKE", "ChunkKV", "SimLayerKV"]
__all__ += ["KVzip", "SqueezeAttention"]
