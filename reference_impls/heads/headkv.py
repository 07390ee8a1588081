"""HeadKV: each head of the model gets its own budget, a shared base plus a share of a global pool proportional to
how much the head retrieves; inside a head, SnapKV picks the tokens.

Paper: Fu, Cai, Asi, Xiong, Dong, Xiao, "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning", arXiv 2410.19258 (ICLR 2025). Section 3: head importance from a
Needle-in-a-Haystack probe (retrieval heads, Wu et al.) extended to retrieval-reasoning heads (R2: the attention a
head pays, among its top-k keys, to the needle while the answer is generated, k = the needle's length); budget
allocation: with B the base budget per head, every head keeps B - B / beta and the pool of L H B / beta tokens is
shared in proportion to the normalised scores, B_{l,h} = (B - B / beta) + s_{l,h} (B / beta) L H; SnapKV selection
within each head (observation window, pooling, top-k).
Official code: https://github.com/FYYFU/HeadKV (`headkv/snapkv_utils.py` `ReasonSnapKVCluster`: B = budget - window,
floor(B / beta), head capacity rounded, + the window; `run_longbench.py`: window 8, kernel 7, max pooling, beta
1.5 by default (the README sweeps 1.005-10), temp 1; `Important_Head/retrieval_head_detection_r2.py`: the R2
score). It ships scores for Meta-Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.2 (`head_scores` takes such a table).
Deviations:
(1) Importance is measured on the shipped "passkey" calibration prompt: the needle is the passkey's digit tokens
    (the haystack has no digits), and one answer step, the last prompt query (it generates the first digit), where
    the official probe sums the R2 rule over every answer token of many needle prompts (and keeps only those it
    answered right), and the shipped prompt states its passkey at depth 0 (tokens ~6-20). No reasoning needles ship
    with Python, so "retrieval-reasoning" here is the R2 rule applied to a retrieval needle. Without a tokenizer (random-weight models) no needle can be found: every head scores the
    same and HeadKV is SnapKV with uniform budgets.
(2) GQA: the official code selects per query head (keys repeated); here a KV head's score is the sum of its group's.
(3) Rounding and caps: head budgets are rounded by largest remainder so the model holds exactly L H_kv B (+ windows)
    tokens, and a head cannot keep more than the prompt: its excess goes back to the pool, shared by the other heads
    in proportion to their scores (the official code rounds each head and never meets the cap on long prompts).
(4) GQA selection inside a head is SnapKV's (the group's mean pooled votes; see `eviction/snapkv.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from reference_impls.base import Model
from reference_impls.eviction.base import EvictingStore
from reference_impls.eviction.snapkv import SnapKV
from reference_impls.heads.base import calibrated

__all__ = ["HeadKV", "HeadKVBudgets", "headkv_budgets", "headkv_scores"]


def headkv_scores(probs: Tensor, needle: Tensor) -> Tensor:
    """The R2 score of one answer step: probs (H, T) the attention of the query that generates it, needle (T,) bool
    -> (H,): sum of the attention on the needle's keys among the head's top-k keys, divided by k = needle size."""
    k = int(needle.sum())
    top, idx = probs.float().topk(k, dim=-1)
    return (top * needle[idx]).sum(-1) / k


def headkv_budgets(shares: Tensor, base: int, beta: float, cap: int) -> Tensor:
    """(N,) tokens each of the model's N heads keeps beyond the window: (B - floor(B / beta)) + s floor(B / beta) N,
    B = base, shares s (N,) summing to 1; capped at `cap` with the excess re-shared (Deviation 3) and rounded by
    largest remainder so that the total is N min(B, cap)."""
    N = shares.numel()
    pool = math.floor(base / beta)  # the official `base_capacity // beta`, per head
    exact = (base - pool) + shares.double() * pool * N
    for _ in range(N):  # water-filling: at most one more head reaches the cap per round
        over = exact > cap
        if not bool(over.any()):
            break
        excess = float((exact[over] - cap).sum())
        exact[over] = float(cap)
        free = exact < cap
        w = shares.double() * free
        w = w / w.sum() if float(w.sum()) > 0 else free.double() / free.sum().clamp(min=1)
        exact = exact + excess * w
    floor = exact.floor()
    missing = round(N * min(base, cap) - float(floor.sum()))
    order = (floor - exact).argsort(stable=True)  # largest fractional part first
    out = floor.long()
    out[order[:max(missing, 0)]] += 1
    return out


@dataclass(frozen=True)
class HeadKVBudgets:
    """The head policy (duck-typed like `policies.Uniform`): counts = window + this layer's share of the model-wide
    allocation. `shares` (L, H_kv) and `layer` are bound by HeadKV.new_layer."""

    beta: float = 1.5
    shares: Optional[Tensor] = field(default=None, repr=False, compare=False)
    layer: int = 0
    budgeted: ClassVar[bool] = True  # a prompt within the budget is kept whole (the official code does not compress)

    def layer_budget(self, n, budget, layer_idx, num_layers, window):
        return budget

    def head_counts(self, scores: Tensor, budget: Tensor, window: int) -> Tensor:
        if self.shares.shape[1] != scores.shape[1]:
            raise ValueError(f"HeadKV: head_scores has {self.shares.shape[1]} heads per layer, the model "
                             f"{scores.shape[1]} KV heads")
        n_valid = torch.isfinite(scores).sum(-1)  # (B, H_kv)
        rows = []
        for b, n in zip(budget.tolist(), n_valid.amax(-1).tolist()):
            if b <= window:  # no room beyond the window: SnapKV keeps its most recent part
                rows.append(torch.full((scores.shape[1],), b, dtype=torch.long))
                continue
            alloc = headkv_budgets(self.shares.flatten(), b - window, self.beta, max(n - window, 0))
            rows.append(alloc.view(self.shares.shape)[self.layer] + window)
        return torch.stack(rows).to(scores.device)


@dataclass
class HeadKV(SnapKV):
    """SnapKV inside each head, budgets per head from head importance; compresses the prefill only.

    Args (ratio, budget = B + window, the average tokens per head; layers; window, kernel_size, pooling: SnapKV's):
        beta: pool size, B / beta per head (official default 1.5).
        head_scores: importance of each (layer, KV head), L lists of H_kv numbers (e.g. the official table summed
            over each GQA group); None measures it on the "passkey" calibration prompt (Deviation 1).
        calib_tokens: length of that prompt.
        heads: "headkv" (this allocation, the default) or any budget policy ("uniform" = SnapKV).
        preset: "headkv" (official: window 8, kernel 7, max pooling), or SnapKV's "kvpress" / "paper".
    """

    beta: float = 1.5
    head_scores: Optional[Any] = None
    calib_tokens: int = 1024
    heads: Any = "headkv"
    preset: str = "headkv"

    PRESETS = {**SnapKV.PRESETS, "headkv": dict(window=8, kernel_size=7, pooling="max")}

    def __post_init__(self):
        own = isinstance(self.heads, HeadKVBudgets) or (isinstance(self.heads, str) and self.heads == "headkv")
        if own:
            self.heads = "uniform"  # validated by the base as a placeholder, then replaced by this allocation
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and self.beta > 1):
            raise ValueError(f"HeadKV: beta must be a number > 1, got {self.beta!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens >= 16):
            raise ValueError(f"HeadKV: calib_tokens must be an int >= 16, got {self.calib_tokens!r}")
        if self.head_scores is not None:
            s = torch.as_tensor(self.head_scores, dtype=torch.float64)
            if s.dim() != 2 or bool((s < 0).any()) or not float(s.sum()) > 0:
                raise ValueError("HeadKV: head_scores must be L lists of H_kv numbers >= 0, not all 0")
        if own:
            self.heads = HeadKVBudgets(self.beta)

    def shares(self, model: Model) -> Tensor:
        """(L, H_kv) normalised head importance: `head_scores` or measured once per model (Deviation 1)."""
        if self.head_scores is not None:
            s = torch.as_tensor(self.head_scores, dtype=torch.float64)
            return s / s.sum()

        def measure(steps):
            needle = passkey_positions(model.tokenizer, self.calib_tokens, steps[0].keys.shape[2])
            scores = []
            for s in steps:
                H, H_kv = s.queries.shape[1], s.keys.shape[1]
                if needle is None:
                    scores.append(torch.ones(H_kv, dtype=torch.float64))
                    continue
                r2 = headkv_scores(s.last(1).probs()[0, :, 0], needle.to(s.keys.device))  # (H,)
                scores.append(r2.double().cpu().view(H_kv, H // H_kv).sum(-1))  # Deviation 2
            s = torch.stack(scores)
            return s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1 / s.numel())

        return calibrated(model, "passkey", self.calib_tokens, ("headkv",), measure)

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        if not isinstance(self.heads, HeadKVBudgets):
            return EvictingStore(self, layer_idx, model)
        shares = self.shares(model)
        if shares.shape[0] != model.num_layers:
            raise ValueError(f"HeadKV: head_scores has {shares.shape[0]} layers, the model {model.num_layers}")
        bound = replace(self)
        bound.heads = HeadKVBudgets(self.beta, shares, layer_idx)
        return EvictingStore(bound, layer_idx, model)


def passkey_positions(tokenizer, tokens: int, T: int) -> Optional[Tensor]:
    """(T,) bool: the passkey's digit tokens in the "passkey" calibration prompt, or None without a tokenizer (or
    when the prompt recorded is not the one the tokenizer makes)."""
    if tokenizer is None:
        return None
    from reference_impls.calibration import calibration_ids

    ids = calibration_ids("passkey", tokens, tokenizer)
    if ids.shape[1] != T:
        return None
    pieces = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    needle = torch.tensor([any(c.isdigit() for c in p) for p in pieces])
    return needle if bool(needle.any()) else None
