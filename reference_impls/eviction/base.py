"""Shared machinery of token eviction: a method scores tokens, this file keeps the top ones.

An eviction method is a dataclass with one `score(step, history, budget)` hook returning (B, H_kv, T)
scores, higher = keep. Methods whose scores build up over steps (H2O's accumulated attention,
Scissorhands' votes) also define `observe(step, history)`: it returns a per-key statistic that the store
keeps aligned with the held tokens (gathered on every eviction, counted in nbytes) and hands back on the
next step. How many tokens are kept is not the scorer's business: two policy fields (see `policies.py`)
turn the target ratio into a budget per layer (`layers`: uniform or pyramid) and per head (`heads`:
uniform, adaptive, threshold), so every scorer runs under every policy. `EvictingStore` does the rest:
budgets, top-k, gather. Kept tokens stay in time order with their post-RoPE keys, so positions never change.

Methods that evict while decoding (StreamingLLM, H2O, TOVA ...) pay for this at every step of every layer, so
the steady state has its own short path: once every head holds exactly its budget, a decoded token comes in and
each head's lowest-scored token goes out (`drop_lowest`: the one the top-k would leave out; on a tie the top-k
decides), with whole-row copies (`_steady_rows`) and no masks, counts, top-k or sort over the cache. Same tokens
kept, same logits, bit for bit (tests/eviction/test_decoding_steady_state.py).

Token merging rides on the same machinery: after the gather, `EvictionMethod.merge` may fold the evicted tokens'
keys and values into the kept ones (CaM, D2O, KVMerger in `reference_impls/merging/`). Kept tokens keep their
slots and positions, so masks, replay and composition with a quantizer work unchanged; only their states change.

Budgets count real tokens: with left padding each row keeps round(n_real / ratio), exactly as if it were
alone in the batch. When rows or heads keep different numbers of tokens (Adaptive heads, padded batches) the
store holds them flat, head after head (varlen, as the official Ada-KV code does for flash-attn's varlen
kernel), plus one count per head; the padded view that attention needs, with empty slots (slot -1) masked
out, exists only while a step runs. Tokens decoded after that reach every head, so they are held apart, in a dense
tail, instead of rebuilding the flat part at every step. So measured bytes are the kept tokens' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, Model, Step, nbytes
from reference_impls.eviction.policies import Uniform, parse_policy

__all__ = ["EvictionMethod", "EvictingStore", "drop_lowest", "evicted", "keep_top", "row_index", "take_rows"]


def row_index(idx: Tensor, T: int) -> Tensor:
    """Per-head row indices idx (B, H_kv, W) into T rows -> the same rows of the flattened (B H_kv T) axis, (B H_kv W,)."""
    B, H = idx.shape[:2]
    return (idx + torch.arange(0, B * H * T, T, device=idx.device).view(B, H, 1)).view(-1)


def take_rows(x: Tensor, idx: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """x (B, H_kv, T, ...) -> (B, H_kv, W, ...): each head's rows idx[b, h] (B, H_kv, W), i.e. x[b, h, idx[b, h]].

    With trailing dims (keys, values (B, H_kv, T, D)), one `index_select` over the flattened (B H_kv T) axis copies
    whole rows (`rows`: `row_index(idx, T)`, computed once for keys and values). Advanced indexing x[b, h, idx] or a
    gather with the index expanded over D computes an offset per element: 55 or 120 us against 15 us for 360 of 361
    fp32 rows of 64 dims on one CPU core, at every decoding step of every layer of a method that evicts while decoding.
    """
    if x.dim() == 3:  # one value per token (slots, a scalar statistic): a plain gather
        return x.gather(2, idx)
    rows = row_index(idx, x.shape[2]) if rows is None else rows
    return x.flatten(0, 2).index_select(0, rows).view(*idx.shape, *x.shape[3:])


def keep_top(scores: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the `counts[b, h]` best scores per (b, h), in time order.

    scores (B, H_kv, T) with -inf where nothing may be kept; counts (B, H_kv) -> (idx, hole), both
    (B, H_kv, max(counts)); idx ascending, hole True where a head keeps fewer than the widest.
    """
    T = scores.shape[-1]
    width = int(counts.max())
    top = scores.topk(width, dim=-1).indices  # (B, H_kv, width), best first
    if bool((counts == width).all()):  # every head keeps as many (uniform budgets): no holes to place
        return top.sort(dim=-1).values, torch.zeros_like(top, dtype=torch.bool)
    hole = torch.arange(width, device=scores.device) >= counts[..., None]
    order = torch.where(hole, top + T, top).sort(dim=-1).values  # time order, holes last
    hole = order >= T
    return torch.where(hole, 0, order), hole


def drop_lowest(scores: Tensor) -> Optional[Tensor]:
    """Indices (B, H_kv, T - 1) of every key but each head's lowest score, in time order; None if a head's lowest
    score is tied.

    scores (B, H_kv, T), T >= 1. This is what `keep_top` keeps when every head keeps T - 1: a unique lowest score is
    the one its top-k leaves out (which of tied ones it leaves out is up to the sort, so ties are left to it). One
    partial selection instead of a top-k and a sort over the whole cache, at every decoding step of every layer.
    """
    T = scores.shape[-1]
    values, low = scores.topk(min(T, 2), dim=-1, largest=False)  # (B, H_kv, 2), the lowest first
    if T > 1 and not bool((values[..., 1] > values[..., 0]).all()):
        return None
    keep = torch.arange(T - 1, device=scores.device)
    return keep + (keep >= low[..., :1])  # skip the dropped index


def evicted(step: Step, idx: Tensor, hole: Tensor) -> Tensor:
    """(B, H_kv, T) bool: the real tokens of `step.keys` that an eviction keeping (idx, hole) drops."""
    T = step.keys.shape[2]
    kept = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool, device=idx.device)
    kept.scatter_(2, idx.masked_fill(hole, T), True)  # empty slots write to a spare column T
    return step.valid & ~kept[..., :T]


@dataclass
class EvictionMethod(KVMethod):
    """Base of scored eviction.

    Args:
        ratio: target compression ratio at the compressing pass, tokens seen / tokens kept (>= 1).
        budget: absolute tokens kept per layer and head; overrides `ratio` when set.
        layers: per-layer budgets, "uniform" or "pyramid" (or a `policies` object such as Pyramid(beta=5)).
        heads: per-head counts, "uniform", "adaptive" or "threshold" (or a `policies` object).
    """

    ratio: float = 2.0
    budget: Optional[int] = None
    layers: Any = field(default_factory=Uniform)
    heads: Any = field(default_factory=Uniform)

    #: keep evicting down to the budget on every later step (bounded memory during generation)
    evict_while_decoding: ClassVar[bool] = False

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"{type(self).__name__}: ratio must be a number >= 1, got {self.ratio!r}")
        if self.budget is not None and not (isinstance(self.budget, int) and self.budget >= 1):
            raise ValueError(f"{type(self).__name__}: budget must be a positive int or None, got {self.budget!r}")
        name = type(self).__name__
        self.layers = parse_policy(self.layers, f"{name}: layers", ("uniform", "pyramid"))
        self.heads = parse_policy(self.heads, f"{name}: heads", ("uniform", "adaptive", "threshold"))

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "EvictionMethod":
        if "ratio" in knobs or "budget" in knobs:  # the caller fixed the budget: the target ratio has no say
            return cls(**knobs)
        return cls(ratio=ratio, **knobs)

    @property
    def window(self) -> int:
        """Tokens at the end of the compressed pass that the scorer always keeps (SnapKV's observation window);
        budget policies reserve them. 0 by default."""
        return 0

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        """A running per-key statistic carried between steps; None (the default) for stateless scores.

        history (B, H_kv, T_held, ...): what this returned on the previous step, for the keys still held, in
        the order of `step.keys` (0 at empty slots); None on the first step. `step.keys` holds those
        T_held keys followed by this step's q new ones. Returns (B, H_kv, T_held + q, ...): any trailing
        dims are carried along with their key.
        """
        return None

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        """(B, H_kv, T) importance of each key in `step.keys`; higher = keep.

        history: this step's `observe` result (or None); budget (B,): tokens per head in this layer.
        """
        raise NotImplementedError

    def merge(self, step: Step, history: Optional[Tensor], idx: Tensor, hole: Tensor, k: Tensor,
              v: Tensor) -> tuple[Tensor, Tensor]:
        """Fold the evicted tokens into the kept ones (token merging); the default keeps them as they are.

        Called right after the kept tokens are gathered. idx, hole (B, H_kv, W): each kept slot's index into
        `step.keys` (time order, see `keep_top`), True at empty slots; k, v (B, H_kv, W, D): the kept keys and
        values; history: this step's `observe` result aligned with `step.keys` (None without one). The dropped
        tokens are `evicted(step, idx, hole)`, their states `step.keys` / `step.values` there. Returns the kept
        (k, v), same shapes: a kept token keeps its slot and position, only its states may change.
        """
        return k, v

    def new_layer(self, layer_idx: int, model: Model) -> "EvictingStore":
        return EvictingStore(self, layer_idx, model)


class EvictingStore(DenseStore):
    """Dense keys/values plus the stream index of each kept token (int32, counted in nbytes)."""

    def __init__(self, method: EvictionMethod, layer_idx: int, model: Model, varlen: bool = True):
        super().__init__()
        self.method, self.layer_idx, self.model, self.varlen = method, layer_idx, model, varlen
        self.slots: Optional[Tensor] = None  # (B, H_kv, T) int32; None until the first eviction
        self.row_budget: Optional[Tensor] = None  # (B,) set by the compressing pass
        self.history: Optional[Tensor] = None  # (B, H_kv, T, ...) the method's running statistic, if it keeps one
        self.counts: Optional[Tensor] = None  # (B, H_kv) int32 while held flat: k, v (N, D), slots (N,), history (N, ...)
        self.seen = 0
        # every head of every row holds exactly its row's budget of real tokens (no holes, no padding) and the head
        # policy keeps that many: then a decoding step adds one real token per head (the interface's last query is
        # always real) and each head drops exactly one, the lowest score (`evict`, `drop_lowest`)
        self.tight = False
        # after a steady-state eviction: the kept (k, v, slots), views of buffers (k, v, slots) with one spare row per
        # head after them, where `append` writes the next token in place instead of concatenating (allocation
        # slack, like a list's capacity: nbytes counts the views, the kept tokens)
        self.spare: Optional[tuple[Tensor, ...]] = None
        # while held flat without a statistic: the tokens decoded since (k, v, slots), (B, H_kv, t, ...), every head
        # the same; they join each head's run in the padded view, so the flat part is not rebuilt every step
        self.tail: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._rows: Optional[tuple] = None  # (counts, head of each flat row, its index in the head), see `_held_rows`
        self._steady: Optional[tuple[Tensor, Tensor]] = None  # see `_steady_rows`

    def append(self, k: Tensor, v: Tensor):
        q = k.shape[2]
        if self.counts is not None and self.history is None:  # held flat: decoded tokens go to the tail, see `_view`
            new = torch.arange(self.seen, self.seen + q, device=k.device, dtype=self.slots.dtype)
            new = (k, v, new.expand(*k.shape[:2], q))
            self.tail = new if self.tail is None else tuple(torch.cat(ab, dim=2) for ab in zip(self.tail, new))
            self.seen += q
            return self._view(q)
        if self.counts is not None:
            self._unflatten()
        spare, self.spare = self.spare, None
        if q == 1 and spare is not None and all(a is b for a, b in zip((self.k, self.v, self.slots), spare)):
            self.k, self.v, self.slots = spare[3:]  # the same values a concatenation gives, without copying the cache
            self.k[:, :, -1:] = k
            self.v[:, :, -1:] = v
            self.slots[..., -1] = self.seen
        else:
            super().append(k, v)
            if self.slots is not None:
                new = torch.arange(self.seen, self.seen + q, device=k.device, dtype=self.slots.dtype)
                self.slots = torch.cat([self.slots, new.expand(*self.slots.shape[:2], q)], dim=2)
        self.seen += q
        return self.k, self.v, self.kept_slots()

    def kept_slots(self) -> Optional[Tensor]:
        if self.counts is not None:
            return self._view(0, slots_only=True).long()
        return None if self.slots is None else self.slots.long()

    def _held_rows(self, extra: int = 0) -> tuple[tuple[int, ...], Tensor]:
        """While held flat: the padded shape (B, H_kv, W), W = the widest head's count + `extra` slots, and, in it,
        the flat row of each held token (N,). Each token's (head, index in it) is kept while the counts stay."""
        if self._rows is None or self._rows[0] is not self.counts:
            keep = torch.arange(int(self.counts.max()), device=self.counts.device) < self.counts[..., None]
            head, within = keep.view(-1, keep.shape[-1]).nonzero().unbind(1)
            self._rows = (self.counts, head, within)
        _, head, within = self._rows
        W = int(self.counts.max()) + extra
        return (*self.counts.shape, W), head * W + within

    @staticmethod
    def _source(shape: tuple[int, ...], rows: Tensor) -> Tensor:
        """(B H_kv W,) for each slot of the padded (B, H_kv, W) layout, the held row it takes (rows (n,): where the
        n held rows go, in order), n for an empty slot."""
        n = rows.numel()
        source = torch.full((shape[0] * shape[1] * shape[2],), n, device=rows.device)
        source[rows] = torch.arange(n, device=rows.device)
        return source

    @staticmethod
    def _gather(held: list[Tensor], fill, source: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The held rows (the tensors of `held` one after another, (n, ...) in all) laid out as `_source` says, `fill`
        at empty slots -> (B, H_kv, W, ...). A gather of whole rows: on this CPU 2-3x cheaper than scattering them into
        a filled tensor (`index_copy_`), at every decoding step of every layer of a store held flat."""
        rest = held[0].shape[1:]
        return torch.cat([*held, held[0].new_full((1, *rest), fill)]).index_select(0, source).view(*shape, *rest)

    def _padded(self, flat: Tensor, fill, held: Optional[tuple] = None) -> Tensor:
        """(N, ...) held head after head -> (B, H_kv, W, ...), each head's tokens first, `fill` after."""
        shape, rows = held or self._held_rows()
        return self._gather([flat], fill, self._source(shape, rows), shape)

    def _view(self, q: int, slots_only: bool = False):
        """While held flat: the padded (k, v, slots) of the held tokens (just slots if `slots_only`), each head's
        flat run, then its tail but the last q tokens, then empty slots, then the last q (this step's, which a
        concatenation puts last). The layout a step-by-step unflatten, append and flatten gives, so logits are
        unchanged, bit for bit; one `_gather` per part from the flat run and the tail."""
        t = 0 if self.tail is None else self.tail[0].shape[2]
        (B, H, W), rows = self._held_rows(t)
        dev = self.counts.device
        if t:  # the tail's first t - q after each head's run, the last q at the end of the row
            at = torch.cat([self.counts.view(-1, 1) + torch.arange(t - q, device=dev),
                            torch.arange(W - q, W, device=dev).expand(B * H, q)], dim=1)
            rows = torch.cat([rows, (torch.arange(0, B * H * W, W, device=dev)[:, None] + at).view(-1)])
        source = self._source((B, H, W), rows)
        tails = (None,) * 3 if self.tail is None else self.tail
        parts = ((self.slots, tails[2], -1),) if slots_only else \
            ((self.k, tails[0], 0), (self.v, tails[1], 0), (self.slots, tails[2], -1))
        outs = [self._gather([flat] if tail is None else [flat, tail.reshape(-1, *flat.shape[1:])], fill, source,
                             (B, H, W)) for flat, tail, fill in parts]
        return outs[0] if slots_only else (outs[0], outs[1], outs[2].long())

    def _unflatten(self, q: int = 0) -> None:
        """Back to the padded layout; with a tail, the one the last step saw (q: its new tokens, see `_view`)."""
        if self.tail is not None or self.history is None:  # (a statistic held flat comes without a tail)
            self.k, self.v, slots = self._view(q)
            self.slots = slots.to(torch.int32)
            self.tail = None
        else:
            shape, rows = self._held_rows()
            source = self._source(shape, rows)
            self.k, self.v, self.slots, self.history = (self._gather([x], fill, source, shape) for x, fill in (
                (self.k, 0), (self.v, 0), (self.slots, -1), (self.history, 0)))
        self.counts = None

    def _flatten(self) -> None:
        keep = self.slots >= 0  # (B, H_kv, W)
        if bool(keep.all()):
            return  # every head holds the same number of tokens: the padded layout wastes nothing
        self.counts = keep.sum(-1).to(torch.int32)
        rows = keep.view(-1).nonzero().squeeze(1)  # row-major = head after head, as x[keep] orders them
        flat = lambda x: x.flatten(0, 2).index_select(0, rows)  # noqa: E731  whole rows, as in `take_rows`
        self.k, self.v, self.slots = flat(self.k), flat(self.v), flat(self.slots)
        if self.history is not None:
            self.history = flat(self.history)

    def _steady_rows(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A steady-state eviction keeping idx (B, H_kv, T - 1): (hole, spare, rows), hole all False (B, H_kv, T - 1),
        spare (B, H_kv, T) each head's kept indices then one spare row (a copy of its row 0) for the next token (see
        `append`), rows (B H_kv T,) the same as flat rows (`row_index`). The row offsets and the hole are the same at
        every step (T stays budget + 1), so they are made once: a decoding step of every layer is a few dozen small
        tensor ops, each a few us."""
        B, H, W = idx.shape
        if self._steady is None or self._steady[0].shape != idx.shape:
            offsets = torch.arange(0, B * H * (W + 1), W + 1, device=idx.device).view(B, H, 1)
            self._steady = (torch.zeros_like(idx, dtype=torch.bool), offsets)
        hole, offsets = self._steady
        spare = F.pad(idx, (0, 1))
        return hole, spare, (spare + offsets).view(-1)

    def after_attention(self, step: Step) -> None:
        self.evict(step)
        if self.slots is not None and self.varlen and not self.tight and self.counts is None:  # tight: no holes
            self._flatten()

    def evict(self, step: Step) -> Optional[tuple[Tensor, Tensor]]:
        """Update the statistic and drop what the budget cannot hold. Returns None when nothing was dropped, else
        (idx, hole) (B, H_kv, W): the index into `step.keys` of each kept token, True at empty slots."""
        m = self.method
        history = self.history = m.observe(step, self.history)
        if history is not None and self.tail is not None:  # a statistic, aligned with the padded step: hold that
            self._unflatten(step.q_len)
        if step.compress:
            n = step.n_real()
            uniform = torch.full_like(n, m.budget) if m.budget is not None else (n.double() / m.ratio).round().long()
            uniform = uniform.clamp(min=1)  # may exceed n: decoding-time eviction starts once n reaches it
            self.row_budget = m.layers.layer_budget(n, uniform, self.layer_idx, self.model.num_layers, m.window)
        elif not (m.evict_while_decoding and self.row_budget is not None):
            return None
        # the steady state of decoding, one token in and one out per head (see `tight`): no masks, counts or top-k
        # (not on a compressing pass: it sets a new budget)
        steady = self.tight and step.q_len == 1 and not step.compress
        scores = m.score(step, history, self.row_budget).float() if steady else None
        idx = None if scores is None else drop_lowest(scores)
        if idx is not None:
            hole, spare, rows = self._steady_rows(idx)
            buffers = tuple(take_rows(x, spare, rows) for x in (self.k, self.v, self.slots))
            k, v, slots = (x[:, :, :-1] for x in buffers)
            k2, v2 = m.merge(step, history, idx, hole, k, v)  # merging methods fold the evicted in
            self.k, self.v, self.slots = k2, v2, slots
            self.spare = (k, v, slots, *buffers) if k2 is k and v2 is v else None  # a merge may give new tensors
            if history is not None:  # the same rows (the spare one left out); no holes, so no statistic to clear
                self.history = take_rows(history, spare, rows)[:, :, :-1]
            return idx, hole
        # the general case (and a tie for the lowest score, which `keep_top` decides as it always did)
        self.tight = False
        if self.counts is not None:  # held flat: gather from the padded layout the step saw
            self._unflatten(step.q_len)
        valid = step.valid
        n_valid = valid.sum(-1)  # (B, H_kv)
        if m.heads.budgeted and bool((n_valid <= self.row_budget[:, None]).all()) and bool(valid.all()):
            return None  # within budget and nothing to tidy: keep everything (bit-identical to full)
        if scores is None:
            scores = m.score(step, history, self.row_budget).float()
        scores = scores.masked_fill(~valid, float("-inf"))
        counts = torch.minimum(m.heads.head_counts(scores, self.row_budget, m.window), n_valid)
        idx, hole = keep_top(scores, counts)
        # tight from now on if every head kept its row's whole budget of real tokens under a uniform head policy
        self.tight = (getattr(type(m.heads), "head_counts", None) is Uniform.head_counts and bool(valid.all())
                      and bool((counts == self.row_budget[:, None]).all()) and not bool(hole.any()))
        self.keep(idx, hole)
        self.k, self.v = m.merge(step, history, idx, hole, self.k, self.v)  # merging methods fold the evicted in
        return idx, hole

    def keep(self, idx: Tensor, hole: Tensor) -> None:
        """Hold only the tokens idx (B, H_kv, W) of the held (unflattened) layout, True in hole at empty slots
        (`keep_top`'s output): keys, values, slots and the statistic are gathered to them (slot -1 and statistic
        0 at empty slots)."""
        T = self.k.shape[2]
        rows = row_index(idx, T)  # whole-row copies, see `take_rows`
        self.k, self.v = take_rows(self.k, idx, rows), take_rows(self.v, idx, rows)
        # a dense store holds every token since the first: its slots are 0 .. T - 1
        slots = self.slots if self.slots is not None else torch.arange(T, device=idx.device).expand(*idx.shape[:2], T)
        self.slots = torch.where(hole, -1, torch.gather(slots.long(), 2, idx)).to(torch.int32)
        if self.history is not None:  # trailing dims (e.g. Scissorhands' per-key window of votes) follow their key
            tail = (1,) * (self.history.dim() - 3)
            self.history = take_rows(self.history, idx).masked_fill(hole.view(*hole.shape, *tail), 0)

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.slots, self.history, self.counts, self.tail)
