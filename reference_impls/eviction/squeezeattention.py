"""SqueezeAttention: give less cache to the layers whose attention barely changes the tokens, more to the others, and
let any token-eviction scorer work inside each layer's own budget.

Paper: Zihao Wang, Bin Cui, Shaoduo Gan, "SqueezeAttention: 2D Management of KV-Cache in LLM Inference via Layer-wise
Optimal Budget", arXiv 2404.04793 (ICLR 2025), as its abstract and official code describe it (the full text's section
and algorithm numbers were not available to check here): a layer's importance is the cosine similarity between the
hidden states before its self-attention block and after it (residual added), averaged over the prompt's tokens; the
layers are clustered by k-means (3 clusters in the code); the cluster of highest similarity keeps p times the initial
budget, the other two share what it frees (the abstract's "two groups" of budgets), so the total is unchanged; H2O,
StreamingLLM or a sliding window then evicts inside each layer under its budget.
Official code: https://github.com/hetailang/SqueezeAttention (`utils_hh/modify_llama_drop.py`: `hidd_data` =
cosine_similarity(layer input, input + attention output) per token, mean per layer; `KMeans(n_clusters=3)` on the
means; class 3 (highest centre) keeps `KV_class3` of the prompt, the others (L `ini_size` - |class 3| `KV_class3`) /
(L - |class 3|)).

How: the allocation is the layer policy `policies.Squeeze` (`squeeze_budgets`); this method measures the similarities
through `Model.trace` (each layer's input and attention output) and binds them to it, and hands every other hook to
its token scorer (`scorer`).
Deviations:
(1) One extra uncompressed forward of the prompt (`Model.trace`), because a layer's budget needs every layer's
    similarity before it evicts; the official code measures them during the prefill and evicts afterwards.
(2) k-means is the exact optimum of the 1-D objective (`policies.kmeans_1d`), where sklearn's KMeans runs Lloyd's
    iterations from a random k-means++ start; budgets are rounded by largest remainder (official: truncated) and
    capped at the prompt, the excess re-spread; both keep the total at L b.
(3) p = 0.38 by default: the official README's tuned Mistral-7B run (samsum) lowers class 3 from 0.21 to 0.08 of the
    prompt (0.08 / 0.21 = 0.38); its Llama-2-7B-32K run (xsum) uses 0.25 / 0.4 = 0.625. The paper's own default p
    is not checked here. The budget is round(n / ratio) per layer before the split, as for every eviction method.
(4) Default scorer H2O (one of the paper's three), with its own deviations (`eviction/h2o.py`); "streamingllm" (4
    sinks) and "window" (sliding window: no sinks) are the other two, and any EvictionMethod may be passed; its own
    ratio, budget and policies are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.eviction.h2o import H2O
from reference_impls.eviction.policies import Squeeze, parse_policy
from reference_impls.eviction.streamingllm import StreamingLLM

__all__ = ["SqueezeAttention", "attention_similarity", "layer_similarities"]

SCORERS = {"h2o": H2O, "streamingllm": StreamingLLM, "window": lambda: StreamingLLM(n_sink=0)}


def attention_similarity(x: Tensor, a: Tensor) -> Tensor:
    """(B,) mean over tokens of cos(x_t, x_t + a_t): x (B, T, d) a layer's input, a (B, T, d) its attention output."""
    x, a = x.float(), a.float()
    return F.cosine_similarity(x, x + a, dim=-1).mean(-1)


def layer_similarities(model: Model):
    """n (B,) -> (B, L): each layer's `attention_similarity` on each row's prompt, from `Model.trace` (memoised)."""
    last: dict = {}

    def similarity(n: Tensor) -> Tensor:
        pos = torch.arange(int(n.max()), device=n.device)
        ids = model.token_ids(torch.where(pos < n[:, None], pos, -1))  # (B, max n), -1 beyond a row's prompt
        rows = []
        for b, row in enumerate(ids):
            key = tuple(row[: int(n[b])].tolist())
            if last.get("key") != key:
                steps = model.trace(row[: int(n[b])][None])
                if any(s.hidden is None for s in steps):
                    raise ValueError("SqueezeAttention: the model's trace has no hidden states (decoder layers with "
                                     "a `self_attn` module are needed)")
                last.update(key=key, sim=torch.cat([attention_similarity(*s.hidden).cpu() for s in steps]))
            rows.append(last["sim"])
        return torch.stack(rows).to(n.device)

    return similarity


@dataclass
class SqueezeAttention(EvictionMethod):
    """Layer budgets by attention's effect on the hidden states (3 k-means groups), a token scorer inside each layer.

    Args (ratio, budget, heads: see EvictionMethod; the total over layers stays L b):
        p: share of b kept by the group of layers whose attention changes the tokens least. groups: k-means groups.
        scorer: "h2o" (default), "streamingllm", "window", or any EvictionMethod (its ratio/budget/policies ignored).
        layers: "squeeze" (default: Squeeze(p, groups), this allocation), a Squeeze object, or "uniform"/"pyramid"
            (the scorer alone, for comparison).
    """

    layers: Any = "squeeze"
    p: float = 0.38
    groups: int = 3
    scorer: Any = "h2o"

    def __post_init__(self):
        own = self.layers if isinstance(self.layers, Squeeze) else Squeeze(self.p, self.groups) \
            if isinstance(self.layers, str) and self.layers == "squeeze" else None  # validates p and groups
        if own is not None:
            self.layers = "uniform"  # validated by the base as a placeholder, replaced by this allocation below
        super().__post_init__()
        if isinstance(self.scorer, str) and self.scorer in SCORERS:
            self.scorer = SCORERS[self.scorer]()
        if not isinstance(self.scorer, EvictionMethod):
            raise ValueError(f"SqueezeAttention: scorer must be one of {', '.join(SCORERS)} or an EvictionMethod, "
                             f"got {self.scorer!r}")
        if own is not None:
            self.layers = own
        else:
            self.layers = parse_policy(self.layers, "SqueezeAttention: layers", ("uniform", "pyramid"))

    @property
    def window(self) -> int:
        return self.scorer.window

    @property
    def evict_while_decoding(self) -> bool:  # H2O and StreamingLLM hold each layer at its budget while decoding
        return self.scorer.evict_while_decoding

    def observe(self, step: Step, history: Optional[Tensor]) -> Optional[Tensor]:
        return self.scorer.observe(step, history)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return self.scorer.score(step, history, budget)

    def merge(self, step, history, idx, hole, k, v):
        return self.scorer.merge(step, history, idx, hole, k, v)

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        if not isinstance(self.layers, Squeeze):
            return EvictingStore(self, layer_idx, model)
        if model.trace is None or model.token_ids is None:
            raise ValueError("SqueezeAttention: needs Model.trace and Model.token_ids (build the cache with KVCache)")
        bound = getattr(self, "_bound", None)
        if layer_idx == 0 or bound is None or bound._model is not model:  # one copy per cache: one measurement
            bound = replace(self, layers=replace(self.layers, similarity=layer_similarities(model)))
            bound._model = model
            self._bound = bound
        return EvictingStore(bound, layer_idx, model)
