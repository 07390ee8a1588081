"""RazorAttention: echo and induction heads keep the whole cache; every other head keeps its sinks, a recent buffer
and one compensation token that stands for all it dropped.

Paper: Tang, Lin, Lin, Han, Ke, Hong, Yao, Wang, "RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads", arXiv 2407.15891 (ICLR 2025). Section 3 (retrieval heads of RoPE models: echo heads attend to the earlier
occurrence of the current token, induction heads to the token that followed it, scored on a repeated random token
sequence; the top 14% induction + 1% echo heads, 15% in all, keep their cache), Algorithm 1 (a non-retrieval head
keeps N0 sink tokens and the last L_h = max(S0, N / C) tokens), Eq. (4) (the dropped keys and values are averaged
into one compensation token) and Eq. (5) (its attention counts as many times as the tokens it replaces; here a logit
bias of log n_d, `LayerStore.logit_bias`).
Official code: none with the paper. The head search ships in the authors' company's toolkit, Huawei msModelSlim
(`RARopeCompressor`: induction_head_ratio=0.14, echo_head_ratio=0.01, 2500 random tokens repeated 4 times).
Deviations:
(1) Calibration: `calib_tokens` / 2 random tokens twice (the "repeat" text, 1024 tokens) instead of 2500 x 4. A
    head's echo (induction) score is the mean attention of the second copy's queries on position i - period
    (i - period + 1), as msModelSlim computes it.
(2) GQA: a KV head is a retrieval head when one of its query heads is: its score is the max over its query heads (as
    msModelSlim); the top fractions are taken over all KV heads of the model, rounded (msModelSlim keeps at least
    one head of each kind, which on a 4-head test model would make half the heads retrieval heads).
(3) The buffer: with `compression` (C) set, L_h = max(S0, round(N / C)) as in Algorithm 1. Left None (from_ratio), C
    is chosen at the compressing pass so the cache holds round(N / ratio) tokens per head on average, sinks and
    compensation token included. L_h never goes below S0, so a ratio beyond what the retrieval heads allow (about
    1 / their share: 15% of the cache -> at most ~6x, less with sinks and buffer) is not met: the cache holds the
    most compressed one Algorithm 1 allows, and the achieved ratio (measured from the bytes) says so.
(4) The prefill is compressed once; tokens generated afterwards are appended to every head.
(5) N0 = 4 (StreamingLLM's sinks) and S0 = 16 are ours for ~1k-token prompts: the paper's long-context values were
    not available to us.
(6) Under `Compose` the compensation token is held but neither weighted (ComposedStore does not forward
    `logit_bias`) nor counted: use RazorAttention alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, nbytes
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.policies import Threshold
from reference_impls.heads.base import SplitStore, calibrated, split_scores

__all__ = ["RazorAttention", "RazorStore", "compensation_token", "echo_induction_scores", "retrieval_heads"]


def echo_induction_scores(probs: Tensor, period: int) -> tuple[Tensor, Tensor]:
    """Section 3: how much each head copies on a sequence that repeats itself (token t == token t - period).

    probs (B, H, q, T): attention of the last q queries (q <= T - period). Returns (echo, induction), each (B, H): the
    mean attention of a query at position i on i - period (the earlier occurrence of its token) and on
    i - period + 1 (the token that followed it).
    """
    B, H, q, T = probs.shape
    i = torch.arange(T - q, T, device=probs.device)  # the queries' positions
    rows = torch.arange(q, device=probs.device)
    echo = probs[:, :, rows, i - period].mean(-1)
    induction = probs[:, :, rows, i - period + 1].mean(-1)
    return echo, induction


def retrieval_heads(echo: Tensor, induction: Tensor, echo_frac: float, induction_frac: float) -> Tensor:
    """(L, H_kv) bool: the top round(induction_frac N) of the N heads by induction score, plus the top
    round(echo_frac N) by echo score. echo, induction (L, H_kv)."""
    out = torch.zeros(echo.shape, dtype=torch.bool)
    for score, frac in ((echo, echo_frac), (induction, induction_frac)):
        k = round(frac * score.numel())
        out.view(-1)[score.flatten().topk(k).indices] = True
    return out


def compensation_token(k: Tensor, v: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (4): the mean of each head's dropped keys and values.

    k, v (B, H_kv, T, D); dropped (B, H_kv, T) bool -> (k_hat, v_hat, n_d): (B, H_kv, 1, D) each (zero where a head
    dropped nothing) and n_d (B, H_kv) the number of tokens each stands for.
    """
    n_d = dropped.sum(-1)
    w = dropped.to(torch.float32)[..., None] / n_d.clamp(min=1)[..., None, None]
    mean = lambda x: (x.float() * w).sum(2, keepdim=True).to(x.dtype)  # noqa: E731
    return mean(k), mean(v), n_d


class RazorStore(SplitStore):
    """The kept tokens of every head (varlen) plus, per head that dropped tokens, its compensation token: held
    before the kept keys, with a logit bias of log n_d and the stream slot of the first token it replaced."""

    def __init__(self, method, layer_idx: int, model: Model):
        super().__init__(method, layer_idx, model)
        self.comp: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None  # k_hat, v_hat, log n_d (fp32), slot (int32)

    def append(self, k: Tensor, v: Tensor):
        kk, vv, slots = super().append(k, v)
        self.width = kk.shape[2]  # the held keys' padded width, which the logit bias spans
        if self.comp is None:
            return kk, vv, slots
        k_hat, v_hat, _, slot = self.comp
        return torch.cat([k_hat, kk], 2), torch.cat([v_hat, vv], 2), torch.cat([slot[..., None].long(), slots], 2)

    def logit_bias(self) -> Optional[Tensor]:
        if self.comp is None:
            return None
        log_n = self.comp[2]  # Eq. (5): the compensation token weighs as n_d copies; the kept keys as themselves
        return torch.cat([log_n[..., None], log_n.new_zeros(*log_n.shape, self.width)], -1)

    def evict(self, step: Step):
        if self.comp is not None and step.compress:
            raise ValueError("RazorAttention compresses once: this cache already holds compensation tokens")
        out = super().evict(step)
        if out is not None and step.compress and self.method.compensate:
            idx, hole = out
            T = step.keys.shape[2]
            # mark what each head kept; empty slots (hole) point at an extra column T
            kept = step.valid.new_zeros(*idx.shape[:2], T + 1).scatter_(2, torch.where(hole, T, idx), True)
            dropped = step.valid & ~kept[..., :T]
            if bool(dropped.any()):
                k_hat, v_hat, n_d = compensation_token(step.keys, step.values, dropped)
                first = torch.where(dropped, torch.arange(T, device=dropped.device), T).amin(-1)  # a stream slot
                self.comp = (k_hat, v_hat, n_d.float().clamp(min=1).log(),
                             torch.where(n_d > 0, first, -1).to(torch.int32))  # -1: no token (masked out)
        return out

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.comp)


@dataclass
class RazorAttention(EvictionMethod):
    """Retrieval heads (echo + induction) keep everything; the others N0 sinks, L_h recent tokens and one
    compensation token. Compresses the prefill once.

    Args (ratio, budget = tokens per head on average, layers: see EvictionMethod):
        echo, induction: fractions of all KV heads kept whole as echo / induction heads (paper: 0.01, 0.14).
        n_sink: N0, initial tokens every head keeps. s0: S0, the shortest recent buffer.
        compression: C; None chooses it for the target ratio (Deviation 3).
        compensate: hold the compensation token (False: drop the remote tokens outright, the paper's ablation).
        calib_tokens: length of the repeated random sequence the heads are scored on.
        heads: Threshold(1.0) keeps exactly each head's keep set (see `reference_impls.heads.base`).
    """

    echo: float = 0.01
    induction: float = 0.14
    n_sink: int = 4
    s0: int = 16
    compression: Optional[float] = None
    compensate: bool = True
    calib_tokens: int = 1024
    heads: Any = field(default_factory=lambda: Threshold(1.0))
    _retrieval: Optional[Tensor] = field(default=None, init=False, repr=False, compare=False)
    _frac: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (
                ("echo", isinstance(self.echo, (int, float)) and 0 <= self.echo <= 1, "a number in [0, 1]"),
                ("induction", isinstance(self.induction, (int, float)) and 0 <= self.induction <= 1,
                 "a number in [0, 1]"),
                ("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0"),
                ("s0", isinstance(self.s0, int) and self.s0 >= 0, "an int >= 0"),
                ("compression", self.compression is None or (isinstance(self.compression, (int, float))
                                                             and self.compression >= 1), "None or a number >= 1"),
                ("compensate", isinstance(self.compensate, bool), "True or False"),
                ("calib_tokens", isinstance(self.calib_tokens, int) and self.calib_tokens >= 16, "an int >= 16")):
            if not ok:
                raise ValueError(f"RazorAttention: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def retrieval(self, model: Model) -> Tensor:
        """(L, H_kv) bool: the model's retrieval heads, scored once on the "repeat" calibration text."""
        def measure(steps):
            T = steps[0].keys.shape[2]
            period = T // 2  # the "repeat" text: T // 2 random tokens, then the same again
            scores = []
            for s in steps:
                echo, induction = echo_induction_scores(s.last(T - period).probs(), period)  # (1, H)
                G = s.queries.shape[1] // s.keys.shape[1]
                scores.append(torch.stack([echo[0], induction[0]]).view(2, -1, G).amax(-1))  # GQA: max of the group
            scores = torch.stack(scores, 1)  # (2, L, H_kv)
            return scores, retrieval_heads(scores[0], scores[1], self.echo, self.induction)

        return calibrated(model, "repeat", self.calib_tokens, ("razor", self.echo, self.induction), measure)[1]

    def new_layer(self, layer_idx: int, model: Model) -> RazorStore:
        heads = self.retrieval(model)
        bound = replace(self)  # this layer's copy knows its retrieval heads
        bound._retrieval, bound._frac = heads[layer_idx], float(heads.float().mean())
        return RazorStore(bound, layer_idx, model)

    def buffer(self, n: Tensor, budget: Tensor) -> Tensor:
        """(B,) L_h, the recent tokens a non-retrieval head keeps: max(S0, N / C) (Algorithm 1), C = `compression`
        or chosen so that a head holds `budget` (B,) tokens on average (Deviation 3)."""
        if self.compression is not None:
            L = n.double() / self.compression
        elif self._frac >= 1:
            L = n.double()
        else:  # f heads hold n tokens, the rest n_sink + L (+ 1, the compensation token): their mean is the budget
            L = (budget.double() - self._frac * n.double()) / (1 - self._frac) - self.n_sink - int(self.compensate)
        return torch.minimum(L.round().long().clamp(min=self.s0), n)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        B, H_kv = step.keys.shape[:2]
        n = step.n_real()
        retrieval = self._retrieval.to(n.device).expand(B, H_kv)
        return split_scores(step.positions, n, retrieval, self.n_sink, self.buffer(n, budget))
