"""Shared machinery of retrieval: hold the whole cache, let each decoding query read only a few keys.

A retrieval method keeps every token's keys and values (a `DenseStore`), plus whatever it needs to choose
(Quest's page bounds, InfLLM's block representatives, Loki's PCA basis), and answers `LayerStore.select(step)`
before each attention call with a (B, H_kv, q, T) mask of the keys that call may read. The prompt is attended
in full (`select` returns None when q > 1, as Quest, SparQ and Loki do); decoding reads the selection.
`read_nbytes()` reports what the call read: the selected keys and values plus what choosing them read.

Memory held is *not* reduced: `nbytes()` counts the whole cache (and the selection's own state), so a
benchmark row shows ~1x in `kv_bytes`; the reduction is in `read_kv_bytes`. Hence `ratio` here is a READ
ratio: a decoding query reads round(n / ratio) of the n tokens its row holds (`budget`: a fixed number
instead). The selection is per KV head: the G query heads of a group share one set of keys (each method says
how it aggregates their scores).

Pieces shared by the methods: `RetrievalMethod` (ratio/budget fields, `from_ratio`, `read_budget`),
`RetrievalStore` (bookkeeping of the bytes read, prefill in full), `top_k_mask` (the per-head top-k with
forced keys and per-row budgets) and `selected_nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, Model, Step, nbytes

__all__ = ["RetrievalMethod", "RetrievalStore", "selected_nbytes", "top_k_mask"]


def top_k_mask(scores: Tensor, k: Tensor, forced: Optional[Tensor] = None) -> Tensor:
    """The k[b] best keys per (b, h), forced keys first and counted in k; never a key scored -inf.

    scores (B, H_kv, T), -inf where a key may not be read; k (B,) int; forced (B, H_kv, T) bool or None.
    Returns (B, H_kv, T) bool. A head with fewer allowed keys than k[b] reads all of them.
    """
    allowed = scores > float("-inf")
    if forced is not None:
        scores = scores.masked_fill(forced, float("inf"))
        allowed = allowed | forced
    width = min(int(k.max()), scores.shape[-1])
    top = scores.topk(width, dim=-1).indices  # (B, H_kv, width), best first
    keep = (torch.arange(width, device=k.device) < k[:, None, None]).expand_as(top)  # rank < k[b]
    mask = torch.zeros_like(allowed).scatter_(-1, top, keep)
    return mask & allowed


def selected_nbytes(sel: Tensor, k: Tensor, v: Tensor) -> int:
    """Bytes of the keys and values a (B, H_kv, T) selection reads from k, v (B, H_kv, T, D)."""
    return int(sel.sum()) * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())


@dataclass
class RetrievalMethod(KVMethod):
    """Base of retrieval methods: the whole cache is held, a decoding query reads `read_budget` tokens.

    Args:
        ratio: READ ratio, tokens held / tokens a decoding query reads (>= 1); memory held is not reduced.
        budget: tokens a decoding query reads per KV head (>= 1); overrides ratio.
    Neither set: the method's paper setting (`DEFAULT_BUDGET` tokens or `DEFAULT_RATIO`).
    """

    ratio: Optional[float] = None
    budget: Optional[int] = None

    DEFAULT_BUDGET: ClassVar[Optional[int]] = None
    DEFAULT_RATIO: ClassVar[Optional[float]] = None

    def __post_init__(self):
        name = type(self).__name__
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"{name}: ratio must be a number >= 1 or None, got {self.ratio!r}")
        if self.budget is not None and not (isinstance(self.budget, int) and self.budget >= 1):
            raise ValueError(f"{name}: budget must be an int >= 1 or None, got {self.budget!r}")

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "RetrievalMethod":
        """The method reading 1/ratio of the held tokens per decoding step (memory held stays ~1x)."""
        if "ratio" in knobs or "budget" in knobs:  # the caller fixed the read budget
            return cls(**knobs)
        return cls(ratio=ratio, **knobs)

    def read_budget(self, n: Tensor) -> Tensor:
        """(B,) tokens held per row -> (B,) tokens a decoding query of that row reads (at least 1)."""
        budget, ratio = self.budget, self.ratio
        if budget is None and ratio is None:
            budget, ratio = self.DEFAULT_BUDGET, self.DEFAULT_RATIO
        if budget is not None:
            return torch.full_like(n, budget)
        return (n.double() / ratio).round().long().clamp(min=1)

    def new_layer(self, layer_idx: int, model: Model) -> DenseStore:
        raise NotImplementedError


class RetrievalStore(DenseStore):
    """A dense cache whose decoding queries read `choose(step)`: subclasses write `choose` (and may `observe`)."""

    def __init__(self, method: RetrievalMethod, layer_idx: int, model: Model):
        super().__init__()
        self.method, self.layer_idx, self.model = method, layer_idx, model
        self.read: Optional[int] = None  # bytes the last attention call read from this store

    def observe(self, step: Step) -> None:
        """Every step, before choosing: keep the selection's own state current (page bounds ...)."""

    def choose(self, step: Step) -> Optional[tuple[Tensor, int]]:
        """A decoding step (q = 1): ((B, H_kv, T) bool keys to read, bytes the choice itself read), or None
        to read everything (e.g. the budget covers the row)."""
        raise NotImplementedError

    def select(self, step: Step) -> Optional[Tensor]:
        self.observe(step)
        chosen = self.choose(step) if step.q_len == 1 else None  # the prompt attends in full
        if chosen is None:
            self.read = nbytes(self.k, self.v)
            return None
        sel, aux = chosen
        sel = sel & step.valid
        self.read = selected_nbytes(sel, self.k, self.v) + aux
        return sel[:, :, None, :]

    def read_nbytes(self) -> Optional[int]:
        return self.read
