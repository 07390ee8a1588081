"""The one interface every method implements. Depends on torch only.

A *method* (a small dataclass, one per file) makes one *store* per transformer layer. A store owns
whatever that layer's cache really holds (dense tensors, kept indices, packed codes, scales ...)
and answers three calls, in this order, for every forward pass of the model:

    k_all, v_all, slots = store.append(k_new, v_new)     # before attention
    out = attention(q, k_all, v_all, mask from slots)      # done by the integration module
    store.after_attention(step)                           # after attention: evict, merge, quantize ...

Shapes: keys/values (B, H_kv, T, D); queries (B, H, q, D) with H = G * H_kv (GQA group size G).
`slots` (B, H_kv, T) int64 gives each returned key's index in the token stream (0 = first token ever
seen), -1 for an empty slot; `None` means "all T tokens seen so far, in order" (no token dropped),
which lets attention take its fast path and keeps an uncompressed store bit-identical to `full`.

Keys arrive after RoPE, so a kept token keeps its original position; new tokens continue from the
true sequence length (the integration module's cache reports tokens *seen*, not tokens kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["DenseStore", "KVMethod", "LayerStore", "Step", "attention_probs", "repeat_kv"]


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, ...) -> (B, H_kv * G, ...): each KV head serves G consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_probs(q: Tensor, k: Tensor, mask: Optional[Tensor], scaling: float) -> Tensor:
    """Softmax attention weights, the slow explicit way (fp32).

    q (B, H, q, D), k (B, H_kv, T, D), mask (B, H_kv, q, T) bool or None -> (B, H, q, T).
    """
    groups = q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float(), repeat_kv(k, groups).float().transpose(-1, -2)).mul_(scaling)
    if mask is not None:  # in place: a 1.5k-token prefill's logits are 9 x 1500 x 1500 per layer
        logits.masked_fill_(~repeat_kv(mask, groups), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # fully masked rows (padding queries) -> 0


@dataclass
class Step:
    """What one attention call of one layer saw; handed to the store right after attention.

    `compress` is True on the forward pass the cache was armed for (by default the first one, the
    prefill); stores that compress once do it then, stores that bound memory act on every step.
    """

    queries: Tensor  # (B, H, q, D), after RoPE
    keys: Tensor  # (B, H_kv, T, D), exactly what attention used
    values: Tensor  # (B, H_kv, T, D)
    slots: Optional[Tensor]  # (B, H_kv, T) or None (dense), as returned by append()
    mask: Optional[Tensor]  # (B, H_kv, q, T) bool, True = may attend; None = plain causal, no padding
    valid: Tensor  # (B, H_kv, T) bool: a real token (not padding, not an empty slot)
    scaling: float
    compress: bool
    layer_idx: int
    num_layers: int
    seen: int  # tokens seen by this layer, including this step's
    pad_valid: Optional[Tensor] = None  # (B, seen) bool: False at left-padding positions; None = no padding
    #: the model's own rotary embedding: positions (B, T) int -> (cos, sin), each (B, T, D) fp32, as the
    #: model applied it (scaling variants included); None when the model has none the cache could find
    rope: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]] = None
    #: (B, seen) int64 ids of every token seen, in stream order (padding included; index with
    #: token_slots()); None when the model was fed embeddings instead of ids
    token_ids: Optional[Tensor] = None
    #: a dict shared by every cache built from one recorded prefill (`cache_from_record`), where stores keep
    #: results that do not depend on the target ratio (e.g. an eviction method's `observe`); None when live
    memo: Optional[dict] = None
    _probs: Optional[Tensor] = field(default=None, repr=False)

    @property
    def q_len(self) -> int:
        return self.queries.shape[2]

    def probs(self) -> Tensor:
        """(B, H, q, T) attention weights of this step, computed once on demand. Read-only: a recorded
        prefill shares them between every method compressing from it."""
        if self._probs is None:
            mask = self.mask
            if mask is None and self.q_len > 1:  # dense causal: query i sees keys up to T - q + i
                T, q = self.keys.shape[2], self.q_len
                causal = torch.ones(q, T, dtype=torch.bool, device=self.keys.device).tril(T - q)
                mask = causal.expand(self.keys.shape[0], self.keys.shape[1], q, T)
            self._probs = attention_probs(self.queries, self.keys, mask, self.scaling)
        return self._probs

    def token_positions(self) -> Tensor:
        """(B, H_kv, T) position of each key among the row's real tokens (what RoPE saw); -1 for holes.

        Equal to the slots without padding; with left padding, the first real token is position 0.
        """
        slots = self.token_slots()
        if self.pad_valid is None:
            return slots
        pos = (self.pad_valid.long().cumsum(-1) - 1)[:, None, :].expand(-1, slots.shape[1], -1)
        return torch.where(self.valid, torch.gather(pos, 2, slots.clamp(min=0)), -1)

    def n_real(self) -> Tensor:
        """(B,) number of real (non-padding) tokens seen per row."""
        if self.pad_valid is None:
            return torch.full((self.keys.shape[0],), self.seen, dtype=torch.long, device=self.keys.device)
        return self.pad_valid.sum(-1)

    def token_slots(self) -> Tensor:
        """(B, H_kv, T) slots, materialised even when the store is dense."""
        if self.slots is not None:
            return self.slots
        B, H, T = self.keys.shape[:3]
        return torch.arange(T, device=self.keys.device).expand(B, H, T)


class LayerStore:
    """The cache of one layer. Subclasses hold real tensors; `nbytes` counts every one of them."""

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Add this step's keys/values (B, H_kv, q, D); return the operands attention must use."""
        raise NotImplementedError

    def after_attention(self, step: Step) -> None:
        """React to the step (evict, merge, re-quantize ...). Default: keep everything."""

    def nbytes(self) -> int:
        """Bytes of the tensors this store holds now (packed where the method packs)."""
        raise NotImplementedError

    def kept_slots(self) -> Optional[Tensor]:
        """(B, H_kv, T_kept) stream indices of what is held; None when nothing was dropped."""
        return None


class KVMethod:
    """Base of every method. Subclasses are dataclasses whose fields are the method's knobs."""

    #: short name used by the CLI and benchmark (the taxonomy id)
    name: str = ""

    def new_layer(self, layer_idx: int, num_layers: int) -> LayerStore:
        raise NotImplementedError

    @classmethod
    def from_ratio(cls, ratio: float) -> "KVMethod":
        """The method configured for a target compression ratio (full bytes / compressed bytes)."""
        raise NotImplementedError(f"{cls.__name__} cannot be configured from a ratio")

    def with_tokenizer(self, tokenizer) -> "KVMethod":
        """The method for this tokenizer's vocabulary. Methods that treat some tokens specially (special
        tokens, punctuation: FastGen) read the ids they need here; the default ignores the tokenizer."""
        return self


class DenseStore(LayerStore):
    """Holds every token's keys and values, in order: the full cache, and the base of evicting stores."""

    def __init__(self) -> None:
        self.k: Optional[Tensor] = None  # (B, H_kv, T, D)
        self.v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v, None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v) if t is not None)
