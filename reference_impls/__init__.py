"""kvatlas reference implementations: every KV-cache compression method behind one interface.

    from reference_impls import load_model, KVCache, StreamingLLM
    model, tok = load_model()                      # embedded SmolLM2-135M-Instruct, offline
    ids = tok("...", return_tensors="pt").input_ids
    out = model.generate(ids, cache=KVCache(model, StreamingLLM(ratio=4)), max_new_tokens=20)

Names are imported on first use, so the `kvatlas` command starts without loading torch for
taxonomy work.
"""

import importlib

_EXPORTS = {
    "DenseStore": "reference_impls.base", "KVMethod": "reference_impls.base", "LayerStore": "reference_impls.base",
    "Model": "reference_impls.base", "Step": "reference_impls.base", "Full": "reference_impls.baseline",
    "Compose": "reference_impls.compose", "EvictionMethod": "reference_impls.eviction",
    "StreamingLLM": "reference_impls.eviction", "SnapKV": "reference_impls.eviction",
    "Quantizer": "reference_impls.quantization.store", "KIVI": "reference_impls.quantization",
    "ThinK": "reference_impls.lowrank", "MiniCache": "reference_impls.crosslayer",
    "KVSharer": "reference_impls.crosslayer",
    "RetrievalMethod": "reference_impls.retrieval", "Quest": "reference_impls.retrieval",
    "ThinK": "reference_impls.lowrank",
    "RazorAttention": "reference_impls.heads", "DuoAttention": "reference_impls.heads", "HeadKV": "reference_impls.heads",
    "KVCache": "reference_impls.integration", "prepare_model": "reference_impls.integration",
    "build_prompt": "reference_impls.generation", "greedy_generate": "reference_impls.generation",
    "run_sample": "reference_impls.generation", "make_method": "reference_impls.methods",
    "load_model": "reference_impls.models", "tiny_llama": "reference_impls.models",
    "Palu": "reference_impls.lowrank", "EigenAttention": "reference_impls.lowrank",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reference_impls' has no attribute {name!r}")
