"""Selective Context: drop the units of the prompt that the model finds least informative.

Paper: Yucheng Li, Bo Dong, Chenghua Lin, Frank Guerin, "Compressing Context to Enhance Inference Efficiency of
Large Language Models", EMNLP 2023, arXiv 2310.06201. Eq. 1: a token's self-information
I(x_t) = -log P(x_t | x_0 .. x_{t-1}) under a causal LM; Eq. 3: a lexical unit's self-information is the sum of its
tokens'; Section 3.3: units below the p-th percentile of self-information are dropped (p is the reduction ratio).
Official code: https://github.com/liyucheng09/Selective_Context

Deviations:
- The scoring LM is the served model itself (`Model.logprobs`), not GPT-2 (the paper also reports LLaMA scorers).
- Units are tokens or sentences; the paper's default "phrase" level uses spaCy noun chunks, which are not a
  dependency here.
- The paper drops units below a percentile of their *count*; here units are dropped, least informative first,
  until the kept tokens fit `n / ratio`, so the measured ratio lands on the target (units that would overflow the
  budget are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, Model
from reference_impls.prompt.units import fill_budget, sentences

__all__ = ["SelectiveContext", "selective_context_keep"]


def selective_context_keep(info: Tensor, units: Tensor, budget: int) -> Tensor:
    """info (n,) self-information per token, units (n,) unit index -> (n,) bool kept tokens: whole units with the
    highest total self-information (Eq. 3) that fit `budget` tokens."""
    n_units = int(units.max()) + 1
    unit_info = torch.zeros(n_units, dtype=torch.float64).index_add_(0, units, info.double())
    keep = fill_budget(unit_info, torch.bincount(units, minlength=n_units), budget)
    return keep[units]


@dataclass
class SelectiveContext(KVMethod):
    """Keep the most informative units of the context; the cache is the shorter prompt's, uncompressed.

    Args:
        ratio: context tokens / kept context tokens (>= 1).
        unit: "sentence" (default) or "token".
    """

    ratio: float = 2.0
    unit: str = "sentence"

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"SelectiveContext: ratio must be a number >= 1, got {self.ratio!r}")
        if self.unit not in ("sentence", "token"):
            raise ValueError(f"SelectiveContext: unit must be one of sentence, token, got {self.unit!r}")

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "SelectiveContext":
        return cls(**knobs) if "ratio" in knobs else cls(ratio=ratio, **knobs)

    def compress_prompt(self, context: Tensor, question: Optional[Tensor], model: Model) -> Tensor:
        if self.ratio == 1 or context.shape[1] < 2:
            return context
        if model.logprobs is None:
            raise ValueError("SelectiveContext needs the model's log-probabilities (Model.logprobs)")
        info = -model.logprobs(context)[0]  # Eq. 1; the first token has no context: 0, kept if its unit is
        units = sentences(context, model.tokenizer) if self.unit == "sentence" else torch.arange(context.shape[1])
        keep = selective_context_keep(info, units, max(1, round(context.shape[1] / self.ratio)))
        return context[:, keep.to(context.device)]

    def new_layer(self, layer_idx: int, model: Model) -> DenseStore:
        return DenseStore()
