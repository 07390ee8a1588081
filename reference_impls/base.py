"""The one interface every method implements. Depends on torch only.

A *method* (a small dataclass, one per file) makes one *store* per transformer layer. A store owns whatever
that layer's cache really holds (dense tensors, kept indices, packed codes, scales ...) and answers three
calls, in this order, for every forward pass of the model:

    k_all, v_all, slots = store.append(k_new, v_new)     # before attention
    out = attention(q, k_all, v_all, mask)                # done by the integration module
    out = store.mix(step, out)                            # before the output projection (default: unchanged)
    store.after_attention(step)                           # after attention: evict, merge, quantize ...

Shapes: keys/values (B, H_kv, T, D); queries (B, H, q, D) with H = G * H_kv (GQA group size G).
`slots` (B, H_kv, T) int gives each returned key's index in the store's token stream (0 = the first token
it was given), -1 for an empty slot; `None` means "every token given so far, in order" (nothing dropped),
which lets attention take its fast path and keeps an uncompressed store bit-identical to `full`.

`Step` is the record of one attention call, in the model's terms: which keys each query could see (`mask`,
always there), where each key and query sits in its row's sequence (`positions`, padding and holes -1), and
the attention weights (`probs()`), computed once whoever asks. A method never rebuilds a causal mask or reads
padding. What a method needs from the model (its rotary embedding, its tokenizer's token classes, the ids of
the tokens seen, the number of layers, the projection weights, the other layers' stores, a calibration prefill)
is a `Model` handed to `new_layer` once, when the stores are made; `Model.trace` runs the model, uncompressed, on
other tokens (e.g. the prompt followed by an instruction to repeat it) for methods that score the prompt that way.

Optional hooks cover the families that change what attention reads, what it returns or what the cache is given:
`LayerStore.select` (retrieval: read a subset of a held cache, bytes read reported by `read_nbytes`),
`LayerStore.logit_bias` (a held key weighs as the tokens it stands for), `LayerStore.mix` (a term added to the
attention output, e.g. SparQ's mean value), `Model.stores` (cross-layer sharing and merging) and
`KVMethod.compress_prompt` (prompt compression).

Keys arrive after RoPE, so a kept token keeps its original position; new tokens continue from the true
sequence length (the integration module's cache reports tokens *seen*, not tokens kept).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["UNIT_BYTES", "DenseStore", "KVMethod", "LayerStore", "Model", "Step", "attention_probs", "nbytes",
           "repeat_kv"]

#: bytes per element of the full cache that compression ratios are counted against: a 16-bit (fp16/bf16) cache,
#: as both seeds count (arXiv 2407.01527: nominal size = fp16 size / r), whatever dtype the model runs in
UNIT_BYTES = 2


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, ...) -> (B, H_kv * G, ...): each KV head serves G consecutive query heads."""
    return x if groups == 1 or x.shape[1] == 1 else x.repeat_interleave(groups, dim=1)


def attention_probs(q: Tensor, k: Tensor, mask: Optional[Tensor], scaling: float, bias: Optional[Tensor] = None
                    ) -> Tensor:
    """Softmax attention weights, the slow explicit way (fp32).

    q (B, H, q, D), k (B, H_kv, T, D), mask (B, H_kv or 1, q, T) bool or None, bias (B, H_kv, T) added to every
    query's logit of that key (see `LayerStore.logit_bias`) or None -> (B, H, q, T); a query that may see no key
    gets a row of zeros. The G query heads of a group are multiplied against their KV head as one block (no copy
    of the keys per query head).
    """
    B, H, n, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    G = H // H_kv
    logits = torch.matmul(q.float().reshape(B, H_kv, G * n, D), k.float().transpose(-1, -2)).mul_(scaling)
    logits = logits.view(B, H_kv, G, n, T)
    if bias is not None:
        logits += bias.float()[:, :, None, None, :]
    if mask is None:  # every key visible: no row can be all -inf
        return torch.softmax(logits, dim=-1).view(B, H, n, T)
    logits.masked_fill_(~mask[:, :, None], float("-inf"))  # in place: a 1.5k-token prefill's logits are 9 x 1500 x 1500 per layer
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).view(B, H, n, T)


def nbytes(*held) -> int:
    """Bytes of every tensor in `held`: tensors, None, anything with `nbytes`, and lists/tuples/dicts of them."""
    total = 0
    for x in held:
        if isinstance(x, (list, tuple)):
            total += nbytes(*x)
        elif isinstance(x, dict):
            total += nbytes(*x.values())
        elif x is not None and not isinstance(x, (int, float, str, bool)):
            n = x.nbytes
            total += n() if callable(n) else n
    return total


@dataclass
class Model:
    """What a method may know about the model, handed to every store once, when the cache is made.

    Args:
        num_layers: decoder layers.
        rope: the model's rotary embedding, positions (B, T) int -> (cos, sin), each (B, T, D) fp32, as its
            attention applied them (scaling variants included); None when the model has none we can find.
        tokenizer: the tokenizer the prompts come from, or None (methods that treat special tokens or
            punctuation apart, e.g. FastGen, then see none).
        token_ids: positions (B, ...) -> ids (B, ...) of the tokens at those positions of each row (-1 gives
            -1); None when the model is fed embeddings. Filled in by the cache as tokens arrive.
    """

    num_layers: int = 1
    rope: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]] = None
    tokenizer: object = None
    token_ids: Optional[Callable[[Tensor], Tensor]] = None
    #: layer -> {"q", "k", "v", "o"}: that layer's attention projection weights, (out_features, in_features) as
    #: nn.Linear holds them (q: (H D, d_model), k/v: (H_kv D, d_model), o: (d_model, H D)); for methods built on
    #: the projections (Palu's SVD, CriticalKV's ||v W_o||). None when the model's layout is not recognised.
    weights: Optional[Callable[[int], dict[str, Tensor]]] = None
    #: this cache's stores, indexed by layer (filled once every store exists): the cross-layer view for methods
    #: that share or merge layers (MiniCache, KVSharer). A store may read another layer's store, never replace it.
    stores: list = field(default_factory=list)
    #: (text, tokens) -> one dense `Step` per layer of an uncompressed prefill of calibration text that ships with
    #: Python ("stdlib": standard-library docstrings; "passkey": a passkey prompt; "repeat": random tokens twice;
    #: "random": random tokens), memoised and cached on disk (see `reference_impls.calibration`).
    calibration: Optional[Callable[..., list]] = None
    #: ids (1, T) -> (1, T) log p(x_t | x_<t) under the model itself (0 for the first token), for methods that
    #: score a prompt before it is prefilled (Selective Context, LLMLingua)
    logprobs: Optional[Callable[[Tensor], Tensor]] = None
    #: ids (1, T) -> one dense `Step` per layer of an uncompressed prefill of those ids, each with `hidden` (the
    #: layer's input and its attention block's output): a forward pass over tokens the cache never sees, against the
    #: model itself, for methods that score the prompt by what the model does on other text built from it (KVzip's
    #: context reconstruction) or by what attention does to the hidden states (SqueezeAttention). Memoised per model
    #: and ids (the last ids asked), so every layer's store, and every cache of that model, shares one extra forward.
    trace: Optional[Callable[[Tensor], list]] = None


@dataclass
class Step:
    """One attention call of one layer, as the store is told about it right after attention.

    `compress` is True on the forward pass the cache was armed for (by default the first one, the prefill);
    stores that compress once do it then, stores that bound memory act on every step.
    """

    queries: Tensor  # (B, H, q, D), after RoPE
    keys: Tensor  # (B, H_kv, T, D), exactly what attention used
    values: Tensor  # (B, H_kv, T, D)
    positions: Tensor  # (B, H_kv, T) int64: each key's position in its row (padding excluded); -1 = hole/padding
    q_positions: Tensor  # (B, q) int64: each query's position; -1 = a padding query
    scaling: float
    compress: bool
    layer_idx: int
    since_compress: int = 0  # forward passes since the compressing pass: 0 on it, -1 before it
    bias: Optional[Tensor] = None  # (B, H_kv, T) logit bias of each key (`LayerStore.logit_bias`), None = 0
    #: (x, a), each (B, q, d_model): the layer's input hidden states (the residual stream, before the attention
    #: block's norm) and its attention block's output (after o_proj, before the residual add). Only in the steps of
    #: `Model.trace`; None in a cache's steps.
    hidden: Optional[tuple[Tensor, Tensor]] = None
    #: every query sees every key (no holes, no padding, one query: a decoding step after uniform eviction or none),
    #: so `mask` is all True and `attn_mask` is None; set by the integration module, never by a method
    all_visible: bool = False
    _mask: Optional[Tensor] = field(default=None, repr=False)
    _probs: Optional[Tensor] = field(default=None, repr=False)

    @classmethod
    def dense(cls, queries: Tensor, keys: Tensor, values: Tensor, *, scaling: Optional[float] = None,
              compress: bool = True, layer_idx: int = 0, start: Optional[int] = None) -> "Step":
        """The step of a store that holds every token in order, with no padding: the last q keys are the queries'
        own tokens (key i is position start + i, start = 0 by default)."""
        B, H_kv, T, _ = keys.shape
        q = queries.shape[2]
        start = 0 if start is None else start
        pos = torch.arange(start, start + T, device=keys.device)
        return cls(queries, keys, values, pos.expand(B, H_kv, T), pos[T - q:].expand(B, q),
                   keys.shape[-1] ** -0.5 if scaling is None else scaling, compress, layer_idx, 0 if compress else 1)

    @property
    def q_len(self) -> int:
        return self.queries.shape[2]

    @functools.cached_property
    def valid(self) -> Tensor:
        """(B, H_kv, T) bool: a real token (not padding, not an empty slot). Computed once."""
        return self.positions >= 0

    @property
    def q_real(self) -> Tensor:
        """(B, q) bool: a real query (not left padding)."""
        return self.q_positions >= 0

    def n_real(self) -> Tensor:
        """(B,) tokens of each row seen so far, this step's included (its last query is always real)."""
        return self.q_positions[:, -1] + 1

    @property
    def mask(self) -> Tensor:
        """(B, H_kv, q, T) bool, True where the query saw the key: causal by position, real keys only; a padding
        query sees nothing (so its attention weights are 0 and it votes for nothing). Built once, on demand."""
        if self._mask is None and self.all_visible:
            self._mask = torch.ones(*self.keys.shape[:2], self.q_len, self.keys.shape[2], dtype=torch.bool,
                                    device=self.keys.device)
        elif self._mask is None and self.q_len == 1:  # one query, the last (always real), after every held key
            self._mask = self.valid[:, :, None, :]
        elif self._mask is None:
            qp = self.q_positions[:, None, :, None]
            self._mask = (self.positions[:, :, None, :] <= qp) & self.valid[:, :, None, :] & (qp >= 0)
        return self._mask

    @property
    def attn_mask(self) -> Optional[Tensor]:
        """`mask`, or None when every query sees every key (`all_visible`): what to hand `attention_probs` (or any
        attention of a method's own), which then skips the masking, at every decoding step of every layer."""
        return None if self.all_visible else self.mask

    def probs(self) -> Tensor:
        """(B, H, q, T) attention weights of this step (fp32), computed once on demand. Read-only: a replayed
        prefill shares them between every method compressing from it."""
        if self._probs is None:
            self._probs = attention_probs(self.queries, self.keys, self.attn_mask, self.scaling, self.bias)
        return self._probs

    def last(self, n: int) -> "Step":
        """The same step restricted to its last n queries (e.g. an observation window); probs are shared."""
        n = min(n, self.q_len)
        if n == self.q_len:  # all of it (a decoding step's one query): the step itself, its mask and probs included
            return self
        return dataclasses.replace(self, queries=self.queries[:, :, -n:], q_positions=self.q_positions[:, -n:],
                                   _mask=None if self._mask is None else self._mask[:, :, -n:],
                                   _probs=None if self._probs is None else self._probs[:, :, -n:],
                                   hidden=None if self.hidden is None else tuple(h[:, -n:] for h in self.hidden))


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

    def select(self, step: Step) -> Optional[Tensor]:
        """Before attention: (B, H_kv, q, T) bool, the held keys each query may read (retrieval methods such as
        Quest read a few pages of a cache they keep whole), or None to read every key `step.mask` allows.
        Attention and `step.mask` (hence `probs()`) then use `step.mask & selection`."""
        return None

    def logit_bias(self) -> Optional[Tensor]:
        """(B, H_kv, T) float added to every query's attention logit of each held key, or None (no bias): log of
        the number of tokens a held key stands for, so that a token merged from m tokens draws attention as m
        copies would (RazorAttention's compensation token, Eq. 5). Counted in `nbytes` by the store that holds it."""
        return None

    def mix(self, step: Step, out: Tensor) -> Tensor:
        """After attention, before the output projection: the attention output out (B, H, q, D) of each query
        head, in the model's dtype -> what the layer passes on (same shape). Default: `out` unchanged. For a term
        that softmax attention over held keys cannot express, e.g. SparQ's (1 - alpha) mean value (Algorithm 1).
        `step` is this call's (its `mask` is what attention read); called before `after_attention(step)`.
        A recorded prefill (`replay.py`) runs no attention, so a store whose `mix` changes a prompt's output
        must belong to a method with `replayable = False`; decoding after a replay calls it as usual."""
        return out

    def read_nbytes(self) -> Optional[int]:
        """Bytes the last attention call read from this store (selected keys/values plus whatever chose them,
        e.g. page bounds), or None when it read everything held (then it equals `nbytes()`)."""
        return None


class KVMethod:
    """Base of every method. Subclasses are dataclasses whose fields are the method's knobs."""

    #: the stores act only after the attention that used the uncompressed prompt, so a benchmark may build this
    #: method's cache from one recorded uncompressed prefill (`replay.py`). A method that changes the prompt's own
    #: attention (KVSharer sharing layers during the prompt) says False and is prefilled live.
    replayable = True

    def new_layer(self, layer_idx: int, model: Model) -> LayerStore:
        raise NotImplementedError

    def compress_prompt(self, context: Tensor, question: Optional[Tensor], model: Model) -> Tensor:
        """Prompt compression: the context ids (1, n) -> the ids to prefill in their place (1, n' <= n), before
        the cache sees anything. `question` (1, m) is given in the query-aware setting, None otherwise. Default:
        the context unchanged. The cache of the shorter prompt is what is measured; ratios still count against
        the full cache of the original prompt."""
        return context

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "KVMethod":
        """The method configured for a target compression ratio (16-bit full bytes / compressed bytes); `knobs`
        are fields the caller fixed, which the ratio must not override."""
        raise NotImplementedError(f"{cls.__name__} cannot be configured from a ratio")


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
        return nbytes(self.k, self.v)
