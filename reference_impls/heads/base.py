"""Shared by the head-level methods: some KV heads keep every token, the others a few sinks and a recent window.

RazorAttention and DuoAttention split the heads of a model, once, from a calibration prefill (`Model.calibration`):
retrieval heads keep their whole cache, every other head keeps its first `n_sink` tokens and its most recent ones.
Both are eviction methods whose score marks each head's keep set (`split_scores`): kept keys score in [1, 2), the
others in (0, 1), in time order. Their default head policy `Threshold(1.0)` keeps exactly the keep set, so heads
hold different numbers of tokens (held flat, varlen, by `EvictingStore`); under a budgeted policy (Uniform,
Adaptive) a head keeps its keep set first and then its most recent tokens. `SplitStore` stays a dense store when no
head dropped anything, so "every head retrieves" is bit-identical to the full cache.

`calibrated` memoises what a method measures on a calibration record, keyed by the record's content (the record
itself is memoised per model and cached on disk by `reference_impls.calibration`), so the stores of every cache of
one model share one measurement.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore

__all__ = ["SplitStore", "calibrated", "split_scores"]

_MEMO: dict = {}


def split_scores(positions: Tensor, n_real: Tensor, retrieval: Tensor, n_sink: int, recent: Tensor) -> Tensor:
    """Keep-set scores of a head split.

    positions (B, H_kv, T) each key's position (-1 = hole), n_real (B,) tokens seen, retrieval (B, H_kv) bool,
    recent (B,) tokens of the recent window -> (B, H_kv, T): 1 + r for a kept key (every key of a retrieval head;
    the first n_sink and the last `recent` positions of the others), r alone otherwise, r = (position + 1) / (n + 1)
    in (0, 1) so that later keys rank higher; -inf at holes.
    """
    n = n_real[:, None, None]
    keep = retrieval[..., None] | (positions < n_sink) | (positions >= n - recent[:, None, None])
    later = (positions + 1).double() / (n + 1).double()
    return torch.where(positions < 0, float("-inf"), keep.double() + later)


def calibrated(model: Model, text: str, tokens: int, key: tuple, measure: Callable[[list[Step]], object]):
    """`measure(steps)` on the calibration prefill (text, tokens) of `model`, computed once per record and `key`."""
    if model.calibration is None:
        raise ValueError("this method calibrates on a prefill of calibration text: build the cache with KVCache (its "
                         "Model carries `calibration`)")
    steps = model.calibration(text, tokens)
    k = steps[0].keys
    probe = k.flatten()[:: max(k.numel() // 32, 1)][:32].float().tolist()  # a fingerprint of the record's content
    memo_key = (text, tokens, len(steps), tuple(k.shape), tuple(probe), key)
    if memo_key not in _MEMO:
        _MEMO[memo_key] = measure(steps)
    return _MEMO[memo_key]


class SplitStore(EvictingStore):
    """An EvictingStore that stays dense (no index kept, attention's fast path) when no head dropped anything."""

    def evict(self, step: Step) -> Optional[tuple[Tensor, Tensor]]:
        dense = self.slots is None
        out = super().evict(step)
        if out is not None and dense and bool(step.valid.all()) and out[0].shape[-1] == step.keys.shape[2] \
                and not bool(out[1].any()):
            self.slots = None  # every head kept every token, in order: the same cache as Full
        return out
