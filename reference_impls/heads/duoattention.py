"""DuoAttention: a gate per KV head, fitted on passkey text, splits the heads into retrieval heads (whole cache) and
streaming heads (attention sinks + a rolling recent window, constant memory).

Paper: Xiao, Tang, Zuo, Guo, Yang, Tang, Fu, Han, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv 2410.10819 (ICLR 2025). Section 3.1-3.2: each head's output is mixed
alpha * full + (1 - alpha) * streaming; the gates alpha in [0, 1] are optimised with the model frozen on synthetic
passkey data to minimise the distance between the full model's and the gated model's outputs on the answer tokens
plus lambda * L1(alpha); Section 3.3: at deployment the heads with the highest gates stay retrieval heads, the
others keep sinks + recent tokens.
Official code: https://github.com/mit-han-lab/duo-attention (`duo_attn/train.py`: lr 0.02, reg 0.05, 2000 steps,
AdamW, warm-up/decay schedule, gates clamped to [0, 1], one gate per KV head; deploy `sparsity` = share of streaming
heads, sink 64 + recent 256). It ships learned patterns for Llama-2-7B-32K-Instruct, Llama-3-8B-Instruct-Gradient-
1048k/4194k, Meta-Llama-3.1-8B-Instruct and Mistral-7B-Instruct v0.2/v0.3 (`attn_patterns/`); none for SmolLM2, and
nothing is downloaded here.
Deviations:
(1) THE PATTERN IS NOT LEARNED END TO END. A method sees the model only through `Model` (the calibration prefill's
    queries, keys and values per layer, and the projection weights), so the distillation target is local: each
    layer's attention output after o_proj, on the last `label_tokens` queries of the "passkey" calibration prompt
    (the question and the answer prefix; the paper distils the last hidden state on the answer tokens, through the
    whole frozen model). That loss is a quadratic form in the gates, sum_l (1 - a_l)^T M_l (1 - a_l), normalised by
    its value with every head streaming; the gates are then fitted with the official optimiser, schedule, clamp and
    L1 weight. Heads of one layer interact through M's off-diagonal terms only, so the ranking stays close to that of
    each head's own output error when streaming (the training-free proxy); ties (gates at 0 or 1) are broken by it.
(2) Sizes for ~1k-token prompts: 4 sinks and a 64-token recent window (calibration and deployment), where the
    official code trains with 128 + 256 and deploys with 64 + 256 on 32k+ contexts.
(3) The ratio: with `retrieval` left None, the compressing pass keeps as many of the top-ranked heads whole as the
    budget (round(n / ratio) tokens per head on average) allows with the others at sinks + recent, and lets the
    streaming heads share what is left over (a wider window); when not even the window fits, no head retrieves
    (StreamingLLM). With `retrieval` set (the paper's mode, 1 - sparsity), the ratio is ignored.
(4) The prefill runs with full attention in every head and is evicted afterwards (the paper's streaming heads
    already prefill with the window); streaming heads then roll their window while decoding, as in the paper.
(5) The shipped "passkey" calibration prompt states its passkey at depth 0 (tokens ~6-20), just past the 4 sinks:
    the distillation sees the heads that read it, but a needle mid-context would set them apart from sink heads
    more cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, repeat_kv
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.policies import Threshold
from reference_impls.heads.base import SplitStore, calibrated, split_scores

__all__ = ["DuoAttention", "duo_gates", "duo_gram", "duo_split"]


def duo_gram(queries: Tensor, keys: Tensor, values: Tensor, w_o: Tensor, scaling: float, *, n_sink: int,
             recent: int, label: int) -> Tensor:
    """(H_kv, H_kv) Gram matrix M of what streaming changes in one layer's output, per KV head (Deviation 1).

    queries (1, H, T, D), keys/values (1, H_kv, T, D) of a dense prefill, w_o (d_model, H D) the output projection.
    For the last `label` queries, d_g = sum over the query heads h of KV head g of W_o[:, h] (o_full,h - o_stream,h),
    where o_stream attends to the first n_sink keys and the last `recent` ones only. M[g, g'] = mean over those
    queries and the d_model channels of d_g . d_g', so that the gated output's squared error is (1 - a)^T M (1 - a).
    """
    _, H, T, D = queries.shape
    H_kv = keys.shape[1]
    q = queries[0, :, T - label:].float()  # (H, label, D)
    q_pos = torch.arange(T - label, T, device=q.device)[:, None]
    k_pos = torch.arange(T, device=q.device)[None, :]
    causal = k_pos <= q_pos
    stream = causal & ((k_pos < n_sink) | (k_pos > q_pos - recent))
    logits = q @ repeat_kv(keys, H // H_kv)[0].float().transpose(-1, -2) * scaling  # (H, label, T)
    v = repeat_kv(values, H // H_kv)[0].float()
    diff = (torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ v
            - torch.softmax(logits.masked_fill(~stream, float("-inf")), -1) @ v)  # (H, label, D)
    d = torch.einsum("mhd,htd->htm", w_o.float().view(-1, H, D), diff)  # each head's share of the output change
    d = d.view(H_kv, H // H_kv, label, -1).sum(1)  # a gate per KV head moves its whole group
    return torch.einsum("gtm,htm->gh", d, d) / (label * d.shape[-1])


def duo_gates(gram: Tensor, *, reg: float = 0.05, lr: float = 0.02, steps: int = 2000) -> Tensor:
    """Gates (L, H_kv) in [0, 1] minimising sum_l (1 - a_l)^T M_l (1 - a_l) / Z + reg * mean(a) (Section 3.2, with
    the local loss of Deviation 1; Z = that loss at a = 0). gram (L, H_kv, H_kv). The official optimiser: AdamW
    (no weight decay) from a = 1, linear warm-up over steps / 5, linear decay over the last fifth (floor 0.1 x lr),
    gates clamped to [0, 1] before each step; the gradient is written out (the loss is quadratic)."""
    M = gram.double()
    Z = M.sum().clamp(min=1e-30)
    a = torch.ones(M.shape[:2], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([a], lr=lr, weight_decay=0.0)
    fifth = max(steps // 5, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, max((s + 1) / fifth, 0.1),
                                                                 max((steps - s) / fifth, 0.1)))
    with torch.no_grad():
        for _ in range(steps):
            a.clamp_(0, 1)
            r = 1 - a
            a.grad = -2 * torch.einsum("lgh,lh->lg", M, r) / Z + reg / a.numel()  # d/da of the loss (a >= 0)
            opt.step()
            sched.step()
        return a.clamp_(0, 1).detach().float()


def duo_split(n: Tensor, budget: Tensor, total: int, n_sink: int, recent: int) -> tuple[Tensor, Tensor]:
    """Deviation 3: (k, window), each (B,): how many of the `total` KV heads of the model keep all n (B,) tokens and
    the recent window of the others, so that the heads hold budget (B,) tokens on average: k = the most heads such
    that the others fit n_sink + recent, then window = what the others can share beyond their sinks."""
    n, b = n.long(), budget.long().clamp(max=n)
    stream = n_sink + recent  # tokens a streaming head holds at least
    room = total * b - total * torch.clamp(n, max=stream)  # the budget beyond every head's minimum
    k = torch.where(n > stream, room.div(torch.clamp(n - stream, min=1), rounding_mode="floor"), total).clamp(0, total)
    left = torch.where(k < total, (total * b - k * n).div(torch.clamp(total - k, min=1), rounding_mode="floor"), n)
    return k, (left - n_sink).clamp(min=0)


@dataclass
class DuoAttention(EvictionMethod):
    """Retrieval heads keep everything; streaming heads keep n_sink sinks and a rolling recent window.

    Args (ratio, budget = tokens per head on average, layers: see EvictionMethod):
        retrieval: fraction of the model's KV heads kept whole (the paper's 1 - sparsity: 0.5 for GQA models, 0.25
            for MHA); None chooses, per prompt, as many as the ratio allows (Deviation 3).
        n_sink, recent: a streaming head's sinks and (least) recent window, in calibration and deployment.
        calib_tokens: length of the "passkey" calibration prompt; label_tokens: its last queries distilled.
        reg, lr, steps: the gate optimisation (official: 0.05, 0.02, 2000).
        heads: Threshold(1.0) keeps exactly each head's keep set (see `reference_impls.heads.base`).
    """

    retrieval: Optional[float] = None
    n_sink: int = 4
    recent: int = 64
    calib_tokens: int = 1024
    label_tokens: int = 32
    reg: float = 0.05
    lr: float = 0.02
    steps: int = 2000
    heads: Any = field(default_factory=lambda: Threshold(1.0))
    evict_while_decoding = True
    _rank: Optional[Tensor] = field(default=None, init=False, repr=False, compare=False)
    _total: int = field(default=0, init=False, repr=False, compare=False)
    _split: Optional[tuple[Tensor, Tensor]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (
                ("retrieval", self.retrieval is None or (isinstance(self.retrieval, (int, float))
                                                         and 0 <= self.retrieval <= 1), "None or a number in [0, 1]"),
                ("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0"),
                ("recent", isinstance(self.recent, int) and self.recent >= 1, "an int >= 1"),
                ("calib_tokens", isinstance(self.calib_tokens, int) and self.calib_tokens >= 16, "an int >= 16"),
                ("label_tokens", isinstance(self.label_tokens, int) and 1 <= self.label_tokens <= self.calib_tokens,
                 "an int in [1, calib_tokens]"),
                ("reg", isinstance(self.reg, (int, float)) and self.reg >= 0, "a number >= 0"),
                ("lr", isinstance(self.lr, (int, float)) and self.lr > 0, "a number > 0"),
                ("steps", isinstance(self.steps, int) and self.steps >= 1, "an int >= 1")):
            if not ok:
                raise ValueError(f"DuoAttention: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def gates(self, model: Model) -> tuple[Tensor, Tensor]:
        """(gates, own error), each (L, H_kv): the fitted gates and each head's error when it alone streams (M's
        diagonal), from the "passkey" calibration prompt; computed once per model."""
        if model.weights is None:
            raise ValueError("DuoAttention needs the attention output projections (Model.weights)")

        def measure(steps):
            gram = torch.stack([duo_gram(s.queries, s.keys, s.values, model.weights(i)["o"], s.scaling,
                                         n_sink=self.n_sink, recent=self.recent,
                                         label=min(self.label_tokens, s.keys.shape[2]))
                                for i, s in enumerate(steps)]).cpu()
            return duo_gates(gram, reg=self.reg, lr=self.lr, steps=self.steps), torch.diagonal(gram, dim1=1, dim2=2)

        key = ("duo", self.n_sink, self.recent, self.label_tokens, self.reg, self.lr, self.steps)
        return calibrated(model, "passkey", self.calib_tokens, key, measure)

    def new_layer(self, layer_idx: int, model: Model) -> SplitStore:
        gates, own = self.gates(model)
        order = own.flatten().argsort(descending=True, stable=True)  # ties of the gates: the larger own error first
        order = order[gates.flatten()[order].argsort(descending=True, stable=True)]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())  # 0 = the model's most retrieving head
        bound = replace(self)  # this layer's copy: its heads' ranks, then the split chosen when it compresses
        bound._rank, bound._total = rank.view(gates.shape)[layer_idx], order.numel()
        return SplitStore(bound, layer_idx, model)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        n = step.n_real()
        if step.compress or self._split is None:
            if self.retrieval is None:
                self._split = duo_split(n, budget, self._total, self.n_sink, self.recent)
            else:
                k = round(self.retrieval * self._total)
                self._split = (torch.full_like(n, k), torch.full_like(n, self.recent))
        k, window = self._split
        retrieval = self._rank.to(n.device)[None, :] < k[:, None]  # (B, H_kv)
        return split_scores(step.positions, n, retrieval, self.n_sink, window)
