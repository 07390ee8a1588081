"""Compose(eviction, quantizer): keep the eviction method's tokens, store them packed by the quantizer, in one cache.

No peer offers this with real bytes: kvpress declined bit-packed quantization presses, KVCache-Factory
de-quantizes through HQQ. Here any `EvictionMethod` composes with any `Quantizer`:

    cache = KVCache(model, Compose(SnapKV(ratio=2), KIVI(bits=4)))   # ~2 x ~2.8 against a 16-bit cache

How: the eviction method decides on the tokens attention just used, exactly as it would alone; the kept
tokens then live in a quantizer store, which is all the layer holds (plus the eviction method's kept slots,
counts and statistic). When the eviction method drops tokens, the quantizer store is rebuilt from the kept
tokens (de-quantized values for tokens already packed), as if those were the whole stream: for prefill-only
eviction (SnapKV and the like) that happens once, on the compressing pass; methods that evict while decoding
(StreamingLLM, H2O ...) re-pack every step they evict, which re-quantizes the surviving tokens of a changed
group (a second rounding, bounded by the step of the new group). Heads that keep different numbers of tokens
(Adaptive heads, padded batches) are held padded in the quantizer store, empty slots included in the bytes.
The achieved ratio is about the product of the parts' ratios (a test checks it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from reference_impls.base import KVMethod, LayerStore, Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.quantization.store import QuantizedStore, Quantizer

__all__ = ["Compose", "ComposedStore"]


@dataclass
class Compose(KVMethod):
    """An eviction method's kept tokens, stored by a quantizer.

    Args:
        evict: any EvictionMethod (its ratio/budget sets how many tokens are kept).
        quant: any Quantizer (its knobs set how they are stored).
    """

    evict: EvictionMethod
    quant: Quantizer

    def __post_init__(self):
        if not isinstance(self.evict, EvictionMethod):
            raise ValueError(f"Compose: evict must be an eviction method, got {type(self.evict).__name__}")
        if not isinstance(self.quant, Quantizer):
            raise ValueError(f"Compose: quant must be a quantization method, got {type(self.quant).__name__}")

    def new_layer(self, layer_idx: int, model: Model) -> "ComposedStore":
        return ComposedStore(self.evict.new_layer(layer_idx, model), lambda: self.quant.new_layer(layer_idx, model))


class ComposedStore(LayerStore):
    """An EvictingStore for the decisions (its dense tensors exist only during a step) + a QuantizedStore for the data."""

    def __init__(self, evict: EvictingStore, make_quant):
        self.ev, self.make_quant = evict, make_quant
        self.ev.varlen = False  # the quantizer holds a rectangular (B, H_kv, T, D) layout
        self.q: QuantizedStore = make_quant()

    def append(self, k: Tensor, v: Tensor):
        kk, vv, _ = self.q.append(k, v)  # the held tokens as the quantizer gives them back, then the new ones
        if self.ev.seen:
            self.ev.k, self.ev.v = kk[:, :, : kk.shape[2] - k.shape[2]], vv[:, :, : vv.shape[2] - v.shape[2]]
        return self.ev.append(k, v)

    def after_attention(self, step: Step) -> None:
        dropped = self.ev.evict(step)
        if dropped is not None:  # the quantizer store is rebuilt from exactly the kept tokens
            idx, hole = dropped
            positions = step.positions.gather(2, idx).masked_fill(hole, -1)
            # the kept tokens are the quantizer's whole stream now: it packs them as it packs a prompt
            kept = dataclasses.replace(step, keys=self.ev.k, values=self.ev.v, positions=positions, compress=True,
                                       _mask=None, _probs=None)
            self.q = self.make_quant()
            self.q.append(self.ev.k, self.ev.v)
            self.q.started = True
            self.q.after_attention(kept)
        else:
            self.q.after_attention(step)
        self.ev.k = self.ev.v = None  # the quantizer store holds the data

    def nbytes(self) -> int:
        # the eviction store's own tensors (kept slots, statistic, counts, a compensation token's count ...);
        # its dense keys/values are None between steps: the quantizer store holds the data
        return self.q.nbytes() + self.ev.nbytes()

    def kept_slots(self) -> Optional[Tensor]:
        return self.ev.kept_slots()

    def logit_bias(self) -> Optional[Tensor]:
        return self.ev.logit_bias()

    def mix(self, step: Step, out: Tensor) -> Tensor:
        return self.q.mix(step, self.ev.mix(step, out))  # the eviction store's term, then the quantizer's
