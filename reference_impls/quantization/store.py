"""One buffered store for every KV quantizer: encoded blocks + a full-precision buffer, written once.

In the spirit of transformers' `QuantizedLayer` (cache_utils.py): new tokens join a full-precision buffer;
attention reads the de-quantized blocks followed by the buffer; after attention the method says how many of
the oldest buffered keys and values to encode now (`flush`), and `encode` turns them into a block of packed
codes, scales, outliers ... that the store keeps. A quantizer is a dataclass with three methods:

    nk, nv = method.flush(held_k, held_v, buffered, step)   # how many buffered keys / values to encode now
    block = method.encode(k, v, step, state)                 # k (B, H_kv, nk, D) or None, v likewise
    k, v = method.decode(block, dtype, state)                # the block's keys (B, H_kv, nk, D), values

`state` is a dict per store for what a method calibrates once and keeps (KVQuant's levels, FP8's scales);
every tensor in a block or in `state` counts in `nbytes`. `step` is the attention call that triggered the
flush, restricted to... nothing: methods that need it (ZipCache's attention scores, KVQuant's positions) read
the last `nk` keys' columns themselves (the buffered tokens are always the newest).

Flushing happens only on or after the compressing pass, so with `KVCache.compress_next` a prompt can be held
in full precision until the chosen pass; `Quantizer.flush` defaults to "everything but the newest
`residual` tokens" once compression started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import KVMethod, LayerStore, Model, Step, nbytes
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec, closest

__all__ = ["QuantizedStore", "Quantizer"]


@dataclass
class Quantizer(KVMethod):
    """Base of every KV quantizer: `encode`/`decode` a block; `flush` says when (default: all but the newest
    `residual_tokens()` tokens, from the compressing pass on)."""

    def residual_tokens(self) -> int:
        """Newest tokens kept in full precision by the default flush."""
        return 0

    def flush(self, held_k: int, held_v: int, buffered: int, step: Step) -> tuple[int, int]:
        """(keys, values) of the buffer to encode now, oldest first. held_*: tokens already encoded."""
        n = max(buffered - self.residual_tokens(), 0)
        return n, n

    def encode(self, k: Optional[Tensor], v: Optional[Tensor], step: Step, state: dict) -> Any:
        raise NotImplementedError

    def decode(self, block: Any, dtype: torch.dtype, state: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        raise NotImplementedError

    def new_layer(self, layer_idx: int, model: Model) -> "QuantizedStore":
        return QuantizedStore(self, model)

    # target ratios -> configurations ------------------------------------------------------------------
    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        raise NotImplementedError

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["Quantizer"]:
        """The configurations `from_ratio` chooses among, most accurate first."""
        return [cls()]

    @classmethod
    def from_ratio(cls, ratio: float, /, cache: CacheSpec = EMBEDDED, **knobs) -> "Quantizer":
        """The candidate whose nominal ratio on `cache` is nearest `ratio`; knobs the caller fixed are kept in
        every candidate (so `bits=4` stays 4-bit whatever the target)."""
        import dataclasses

        options = [dataclasses.replace(c, **knobs) for c in cls.candidates(cache)]
        return closest(ratio, options, cache, cls.__name__)


class QuantizedStore(LayerStore):
    """Encoded blocks (oldest first) + the newest tokens in full precision, for keys and for values."""

    def __init__(self, method: Quantizer, model: Model):
        self.method, self.model = method, model
        self.blocks: list = []  # method-defined blocks, in stream order
        self.state: dict = {}  # what the method calibrated for this layer
        self.k: Optional[Tensor] = None  # (B, H_kv, n_k, D) keys not encoded yet, the newest
        self.v: Optional[Tensor] = None
        self.held_k = self.held_v = 0  # tokens encoded
        self.started = False  # the compressing pass has run

    def decoded(self, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
        ks, vs = [], []
        for block in self.blocks:
            k, v = self.method.decode(block, dtype, self.state)
            if k is not None:
                ks.append(k)
            if v is not None:
                vs.append(v)
        return ks, vs

    def append(self, k: Tensor, v: Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        if not self.blocks:
            return self.k, self.v, None
        ks, vs = self.decoded(k.dtype)
        return torch.cat(ks + [self.k], dim=2), torch.cat(vs + [self.v], dim=2), None

    def after_attention(self, step: Step) -> None:
        self.started = self.started or step.compress
        if not self.started:
            return
        nk, nv = self.method.flush(self.held_k, self.held_v, self.k.shape[2], step)
        if nk == 0 and nv == 0:
            return
        block = self.method.encode(self.k[:, :, :nk] if nk else None, self.v[:, :, :nv] if nv else None, step,
                                   self.state)
        self.blocks.append(block)
        self.k, self.v = self.k[:, :, nk:], self.v[:, :, nv:]
        self.held_k, self.held_v = self.held_k + nk, self.held_v + nv

    def nbytes(self) -> int:
        return nbytes(self.blocks, self.state, self.k, self.v)
