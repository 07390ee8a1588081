"""Shared machinery of token eviction: a method scores tokens, this file keeps the top ones.

An eviction method is a dataclass with one `score(step, history, budget)` hook returning (B, H_kv, T)
scores, higher = keep. Methods whose scores build up over steps (H2O's accumulated attention,
Scissorhands' votes) also define `observe(step, history)`: it returns a per-key statistic that the store
keeps aligned with the held tokens (gathered on every eviction, counted in nbytes) and hands back on the
next step. How many tokens are kept is not the scorer's business: two policy fields (see `policies.py`)
turn the target ratio into a budget per layer (`layers`: uniform or pyramid) and per head (`heads`:
uniform, adaptive, threshold), so every scorer runs under every policy. `EvictingStore` does the rest:
budgets, top-k, gather. Kept tokens stay in time order with their post-RoPE keys, so positions never change.

Token merging rides on the same machinery: after the gather, `EvictionMethod.merge` may fold the evicted tokens'
keys and values into the kept ones (CaM, D2O, KVMerger in `reference_impls/merging/`). Kept tokens keep their
slots and positions, so masks, replay and composition with a quantizer work unchanged; only their states change.

Budgets count real tokens: with left padding each row keeps round(n_real / ratio), exactly as if it were
alone in the batch. When rows or heads keep different numbers of tokens (Adaptive heads, padded batches) the
store holds them flat, head after head (varlen, as the official Ada-KV code does for flash-attn's varlen
kernel), plus one count per head; the padded view that attention needs, with empty slots (slot -1) masked
out, exists only while a step runs. So measured bytes are the kept tokens' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, Model, Step, nbytes
from reference_impls.eviction.policies import Uniform, parse_policy

__all__ = ["EvictionMethod", "EvictingStore", "evicted", "keep_top"]


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

    def append(self, k: Tensor, v: Tensor):
        q = k.shape[2]
        if self.counts is not None:
            self._unflatten()
        super().append(k, v)
        if self.slots is not None:
            new = torch.arange(self.seen, self.seen + q, device=k.device, dtype=self.slots.dtype)
            self.slots = torch.cat([self.slots, new.expand(*self.slots.shape[:2], q)], dim=2)
        self.seen += q
        return self.k, self.v, self.kept_slots()

    def kept_slots(self) -> Optional[Tensor]:
        if self.counts is not None:
            return self._padded(self.slots, -1).long()
        return None if self.slots is None else self.slots.long()

    def _padded(self, flat: Tensor, fill) -> Tensor:
        """(N, ...) held head after head -> (B, H_kv, W, ...), each head's tokens first, `fill` after."""
        keep = torch.arange(int(self.counts.max()), device=flat.device) < self.counts[..., None]
        out = flat.new_full((*keep.shape, *flat.shape[1:]), fill)
        out[keep] = flat
        return out

    def _unflatten(self) -> None:
        self.k, self.v, self.slots = self._padded(self.k, 0), self._padded(self.v, 0), self._padded(self.slots, -1)
        if self.history is not None:
            self.history = self._padded(self.history, 0)
        self.counts = None

    def _flatten(self) -> None:
        keep = self.slots >= 0  # (B, H_kv, W)
        if bool(keep.all()):
            return  # every head holds the same number of tokens: the padded layout wastes nothing
        self.counts = keep.sum(-1).to(torch.int32)
        self.k, self.v, self.slots = self.k[keep], self.v[keep], self.slots[keep]  # row-major = head after head
        if self.history is not None:
            self.history = self.history[keep]

    def after_attention(self, step: Step) -> None:
        self.evict(step)
        if self.slots is not None and self.varlen:
            self._flatten()

    def evict(self, step: Step) -> Optional[tuple[Tensor, Tensor]]:
        """Update the statistic and drop what the budget cannot hold. Returns None when nothing was dropped, else
        (idx, hole) (B, H_kv, W): the index into `step.keys` of each kept token, True at empty slots."""
        m = self.method
        history = self.history = m.observe(step, self.history)
        if step.compress:
            n = step.n_real()
            uniform = torch.full_like(n, m.budget) if m.budget is not None else (n.double() / m.ratio).round().long()
            uniform = uniform.clamp(min=1)  # may exceed n: decoding-time eviction starts once n reaches it
            self.row_budget = m.layers.layer_budget(n, uniform, self.layer_idx, self.model.num_layers, m.window)
        elif not (m.evict_while_decoding and self.row_budget is not None):
            return None
        valid = step.valid
        n_valid = valid.sum(-1)  # (B, H_kv)
        if m.heads.budgeted and bool((n_valid <= self.row_budget[:, None]).all()) and bool(valid.all()):
            return None  # within budget and nothing to tidy: keep everything (bit-identical to full)
        scores = m.score(step, history, self.row_budget).float().masked_fill(~valid, float("-inf"))
        counts = torch.minimum(m.heads.head_counts(scores, self.row_budget, m.window), n_valid)
        idx, hole = keep_top(scores, counts)
        self.keep(idx, hole)
        self.k, self.v = m.merge(step, history, idx, hole, self.k, self.v)  # merging methods fold the evicted in
        return idx, hole

    def keep(self, idx: Tensor, hole: Tensor) -> None:
        """Hold only the tokens idx (B, H_kv, W) of the held (unflattened) layout, True in hole at empty slots
        (`keep_top`'s output): keys, values, slots and the statistic are gathered to them (slot -1 and statistic
        0 at empty slots)."""
        T = self.k.shape[2]
        rows = (torch.arange(idx.shape[0], device=idx.device)[:, None, None],
                torch.arange(idx.shape[1], device=idx.device)[None, :, None], idx)
        # whole rows by advanced indexing: one contiguous copy per kept token (gather with an index expanded
        # over D reads it element by element, several times slower on CPU)
        self.k, self.v = self.k[rows], self.v[rows]
        # a dense store holds every token since the first: its slots are 0 .. T - 1
        slots = self.slots if self.slots is not None else torch.arange(T, device=idx.device).expand(*idx.shape[:2], T)
        self.slots = torch.where(hole, -1, torch.gather(slots.long(), 2, idx)).to(torch.int32)
        if self.history is not None:  # trailing dims (e.g. Scissorhands' per-key window of votes) follow their key
            tail = (1,) * (self.history.dim() - 3)
            self.history = self.history[rows].masked_fill(hole.view(*hole.shape, *tail), 0)

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.slots, self.history, self.counts)
