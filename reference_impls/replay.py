"""Prefill once, compress many: record one uncompressed prefill, then build each method's cache from it.

A benchmark compares many methods and ratios on the same prompt; the prefill (the expensive part on CPU) is
the same for all of them, because every store acts only after the attention that used the full states. So
`record_prefill` keeps every layer's queries, keys and values once, and `cache_from_record` hands each
method's stores exactly the append and the step a live prefill would have given them (a test checks that the
replayed generation equals the live one). The prefill's attention weights (`Step.probs()`) are computed once,
by the first method that asks, and shared with every later replay of the record: the sharing lives here, at
the replay boundary; method files never see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import KVMethod, LayerStore, Model, Step
from reference_impls.integration import KVCache

__all__ = ["PrefillRecord", "cache_from_record", "record_prefill"]


@dataclass
class PrefillRecord:
    """Per-layer (queries, keys, values) of one uncompressed prefill (batch 1), and its last logits."""

    queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    scaling: float
    logits: Tensor  # (1, 1, vocab) at the last prompt position
    seconds: float  # wall time of the prefill
    input_ids: Optional[Tensor] = None  # (1, T)
    #: layer -> the prefill's attention weights (1, H, T, T), once some replayed method asked for them
    probs: dict = field(default_factory=dict)


class _Recorder(LayerStore):
    def __init__(self, sink: dict, layer_idx: int):
        self.sink, self.layer_idx = sink, layer_idx

    def append(self, k, v):
        self.sink["k"][self.layer_idx], self.sink["v"][self.layer_idx] = k, v
        return k, v, None

    def after_attention(self, step: Step) -> None:
        self.sink["q"][self.layer_idx] = step.queries
        self.sink["scaling"] = step.scaling

    def nbytes(self) -> int:
        return 0


@dataclass
class _RecordMethod(KVMethod):
    sink: dict

    def new_layer(self, layer_idx: int, model: Model) -> LayerStore:
        return _Recorder(self.sink, layer_idx)


@torch.no_grad()
def record_prefill(model, input_ids: Tensor) -> PrefillRecord:
    """Run one uncompressed prefill (batch 1) and keep every layer's queries, keys and values."""
    n = model.config.num_hidden_layers
    sink: dict = {"q": [None] * n, "k": [None] * n, "v": [None] * n}
    cache = KVCache(model, _RecordMethod(sink))
    t0 = time.perf_counter()
    logits = model(input_ids=input_ids.to(next(model.parameters()).device), cache=cache, use_cache=True).logits
    return PrefillRecord(sink["q"], sink["k"], sink["v"], sink["scaling"], logits[:, -1:], time.perf_counter() - t0,
                         input_ids=cache.token_ids)


def cache_from_record(model, method: KVMethod, record: PrefillRecord, tokenizer=None, elided: int = 0) -> KVCache:
    """The cache `method` would hold after a live prefill: each store gets the same append and step.

    elided: prompt tokens a prompt-compression method removed before this (shorter) prompt was recorded; the
    full-cache bytes count them, as a live `KVCache` with `elided` set does."""
    cache = KVCache(model, method, tokenizer)
    cache.elided = elided
    T = record.keys[0].shape[2]
    cache.token_ids = record.input_ids
    for i, layer in enumerate(cache.layers):
        k, v = record.keys[i], record.values[i]
        kk, vv, _ = layer.store.append(k, v)
        layer.seen = T
        layer.full_elems, layer.itemsize = 2 * k.shape[0] * k.shape[1] * (T + elided) * k.shape[3], k.element_size()
        step = Step.dense(record.queries[i], kk, vv, scaling=record.scaling, layer_idx=i)
        selected = layer.store.select(step)
        if selected is not None:  # a retrieval store reads a subset even of the prompt (as it would live)
            step._mask = step.mask & selected
        step.bias = layer.store.logit_bias()
        # the attention weights are shared only when the store handed attention the recorded keys themselves
        same = kk is k and selected is None and step.bias is None
        step._probs = record.probs.get(i) if same else None
        # no attention output is computed here, so `store.mix` has nothing to change (see `LayerStore.mix`)
        layer.store.after_attention(step)
        if same and step._probs is not None:
            record.probs.setdefault(i, step._probs)
    cache.compress_next, cache.since_compress, cache.compressed_at = False, 0, T
    return cache
