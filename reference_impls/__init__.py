"""kvatlas reference implementations: every KV-cache compression method behind one interface.

    from reference_impls import load_model, KVCache, StreamingLLM
    model, tok = load_model()                      # embedded SmolLM2-135M-Instruct, offline
    out = model.generate(**tok("...", return_tensors="pt"), cache=KVCache(model, StreamingLLM(ratio=4)))
"""

from reference_impls.base import DenseStore, KVMethod, LayerStore, Step
from reference_impls.baseline import Full
from reference_impls.eviction import EvictionMethod, StreamingLLM
from reference_impls.integration import KVCache, build_prompt, greedy_generate, prepare_model, run_sample
from reference_impls.models import load_model, tiny_llama

__all__ = ["DenseStore", "EvictionMethod", "Full", "KVCache", "KVMethod", "LayerStore", "Step", "StreamingLLM",
           "build_prompt", "greedy_generate", "load_model", "prepare_model", "run_sample", "tiny_llama"]
