"""Quest: per page of keys, their channel-wise min and max bound what a query can score; read the top pages.

Paper: Tang, Zhao, Zhu, Xiao, Kasikci, Han, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv 2406.10774 (ICML 2024), Section 3.4 / Algorithm 1 (per page the element-wise min m and max M
of its keys; criticality U = sum_d max(q_d m_d, q_d M_d), an upper bound of q.k over the page; attention over
the top-K pages), Section 3.5 (reads 1/S + K/L of the cache), Section 4.1 (page size 16, first two layers dense).
Official code: https://github.com/mit-han-lab/Quest (`quest/utils/controller.py`: the page budget includes the
last page, which is always read; `evaluation/quest_attention.py`: the simulated-sparsity evaluation).
Deviations: (1) GQA: one page set per KV head; a page's score is the max over the group's query heads of
their bounds (still an upper bound of any q.k in the page; the paper's models have no GQA). (2) Pages are
counted by position from each row's first token (the official paged cache numbers pages the same way). (3) The
budget is round(n / ratio) tokens (or `budget`), K = max(1, budget // page_size) pages including the current
one; the official evaluation script also reads at least 3 pages. (4) The bounds are held in the keys' dtype
and counted in `nbytes`; a layer whose pages all fit the budget reads everything without reading its bounds
(as the official `need_estimate` does).

Presets: page_size 16 and dense_layers 2 (Section 4.1); without ratio or budget, 1024 tokens read (Section 4.2:
"a budget of 1K tokens" is on par with the full cache on LongBench). `ratio` sets the READ budget only:
memory held is the whole cache plus two bound vectors per page (~1 + 2/16 of it for K only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, Model, Step, nbytes
from reference_impls.retrieval.base import RetrievalMethod, RetrievalStore, top_k_mask

__all__ = ["Quest", "quest_page_scores"]


def quest_page_scores(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Algorithm 1's criticality of each page, the max over each GQA group.

    q (B, H, D) one query per head; kmin, kmax (B, H_kv, P, D) per-page element-wise min and max of the keys.
    Returns (B, H_kv, P): max over the G heads of sum_d max(q_d m_d, q_d M_d) >= q.k for every key of the page.
    """
    B, H, D = q.shape
    H_kv = kmin.shape[1]
    qg = q.float().view(B, H_kv, H // H_kv, 1, D)  # (B, H_kv, G, 1, D)
    lo, hi = qg * kmin.float()[:, :, None], qg * kmax.float()[:, :, None]  # (B, H_kv, G, P, D)
    return torch.maximum(lo, hi).sum(-1).amax(dim=2)


@dataclass
class Quest(RetrievalMethod):
    """Pages of `page_size` tokens with min/max key bounds; a decoding query reads the top pages by bound.

    Args (ratio, budget: see RetrievalMethod; tokens read = K pages x page_size):
        page_size: tokens per page (paper: 16).
        dense_layers: the first layers read everything and hold no bounds (paper: 2).
    """

    page_size: int = 16
    dense_layers: int = 2

    DEFAULT_BUDGET = 1024

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.page_size, int) and self.page_size >= 1):
            raise ValueError(f"Quest: page_size must be an int >= 1, got {self.page_size!r}")
        if not (isinstance(self.dense_layers, int) and self.dense_layers >= 0):
            raise ValueError(f"Quest: dense_layers must be an int >= 0, got {self.dense_layers!r}")

    def new_layer(self, layer_idx: int, model: Model) -> DenseStore:
        # Sec. 3.4: the first layers are barely sparse, Quest leaves them dense
        return DenseStore() if layer_idx < self.dense_layers else QuestStore(self, layer_idx, model)


class QuestStore(RetrievalStore):
    """The whole cache plus, per page, the min and max of its keys: kmin, kmax (B, H_kv, P, D)."""

    def __init__(self, method: Quest, layer_idx: int, model: Model):
        super().__init__(method, layer_idx, model)
        self.kmin: Optional[Tensor] = None
        self.kmax: Optional[Tensor] = None

    def observe(self, step: Step) -> None:
        """Fold this step's new keys (the last q of step.keys) into their pages' bounds."""
        q, S = step.q_len, self.method.page_size
        new, pos = step.keys[:, :, -q:], step.positions[:, :, -q:]
        B, H_kv, _, D = new.shape
        pages = int(step.positions.max()) // S + 1
        if self.kmin is None:
            self.kmin = new.new_full((B, H_kv, 0, D), float("inf"))
            self.kmax = new.new_full((B, H_kv, 0, D), float("-inf"))
        grow = pages - self.kmin.shape[2]
        if grow > 0:  # an empty page: min = +inf, max = -inf until a key arrives
            self.kmin = torch.cat([self.kmin, new.new_full((B, H_kv, grow, D), float("inf"))], dim=2)
            self.kmax = torch.cat([self.kmax, new.new_full((B, H_kv, grow, D), float("-inf"))], dim=2)
        real = (pos >= 0)[..., None]  # padding keys bound nothing
        idx = (pos.clamp(min=0) // S)[..., None].expand_as(new)
        self.kmin.scatter_reduce_(2, idx, new.masked_fill(~real, float("inf")), "amin")
        self.kmax.scatter_reduce_(2, idx, new.masked_fill(~real, float("-inf")), "amax")

    def choose(self, step: Step) -> Optional[tuple[Tensor, int]]:
        S = self.method.page_size
        n = step.n_real()
        pages = (self.method.read_budget(n) // S).clamp(min=1)  # K, the current page included
        P = self.kmin.shape[2]
        if bool((pages >= (n + S - 1) // S).all()):
            return None  # every page fits the budget: read all, no estimate (official `need_estimate`)
        U = quest_page_scores(step.queries[:, :, -1], self.kmin, self.kmax)  # (B, H_kv, P)
        U = U.masked_fill(self.kmin[..., 0] == float("inf"), float("-inf"))  # pages with no key yet
        current = torch.arange(P, device=U.device) == (step.q_positions[:, -1] // S)[:, None, None]
        chosen = top_k_mask(U, pages, forced=current.expand_as(U))  # (B, H_kv, P)
        page_of = (step.positions.clamp(min=0) // S)  # (B, H_kv, T)
        return torch.gather(chosen, 2, page_of), nbytes(self.kmin, self.kmax)  # every page's bounds were read

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.kmin, self.kmax)
