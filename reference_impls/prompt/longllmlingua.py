"""LongLLMLingua: LLMLingua made question-aware: documents ranked by how well they predict the question, tokens by
how much the question changes their surprise, the best documents first and compressed least.

Paper: Huiqiang Jiang, Qianhui Wu, Xufang Luo, Dongsheng Li, Chin-Yew Lin, Yuqing Yang, Lili Qiu, "LongLLMLingua:
Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt Compression", ACL 2024, arXiv 2310.06839.
Section 4.1: question-aware coarse-grained compression, r_k = -(1/N_c) sum_i log p(x^{que,restrict}_i | x^doc_k)
(Eq. 2: the question followed by the restrictive sentence "We can get the answer to this question in the given
documents.", conditioned on each document; lower is more relevant) and question-aware fine-grained compression by
contrastive perplexity s_i = ppl(x_i | x_<i) - ppl(x_i | x^que, x_<i) (Eq. 3); Section 4.2: documents reordered by
r_k; Section 4.3: dynamic ratios tau_k = max(min((1 - 2 I(r_k) / K') dtau + tau_doc, 1), 0) by rank I(r_k) among
the K' kept documents; Section 4.4: subsequence recovery of the response.
Official code: https://github.com/microsoft/LLMLingua (`rank_method="longllmlingua"`,
`condition_in_question="after_condition"`, `reorder_context="sort"`, `condition_compare=True`,
`dynamic_context_compression_ratio` 0.3 in its examples; `iterative_size=200`, `context_budget="+100"`).

Deviations: those of `LLMLingua` (the served model scores, documents are runs of sentences, no alignment), and:
- Query-agnostic setting (no question when the prompt is compressed): falls back to LLMLingua's scores and order.
- Subsequence recovery (Section 4.4) post-processes the model's answer and is not done: the cache is the point here.
- The question is the rest of the prompt after the context (question text, end of turn, assistant header and
  answer prefix), since that is what the model conditions on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import Model
from reference_impls.prompt.llmlingua import LLMLingua

__all__ = ["LongLLMLingua", "contrastive_perplexity", "dynamic_ratios"]

RESTRICT = " We can get the answer to this question in the given documents."


def contrastive_perplexity(model: Model, question: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Eq. 3 as ITPC's score: (prefix, segment) -> (s,) -log p(x_i | prefix, x_<i) + log p(x_i | question, prefix, x_<i)."""
    def score(prefix: Tensor, segment: Tensor) -> Tensor:
        plain = model.logprobs(torch.cat([prefix, segment], dim=1))[0, prefix.shape[1]:]
        cond = model.logprobs(torch.cat([question.to(prefix.device), prefix, segment], dim=1))[0, -segment.shape[1]:]
        return cond - plain
    return score


def dynamic_ratios(rank: Tensor, kept: int, tau: float, delta: float) -> Tensor:
    """Section 4.3: keep fraction of each kept document by its rank (0 = most relevant) among `kept`."""
    return ((1 - 2 * rank.double() / kept) * delta + tau).clamp(0, 1)


@dataclass
class LongLLMLingua(LLMLingua):
    """Question-aware coarse-to-fine prompt compression (knobs of `LLMLingua`, plus):

    Args:
        dynamic: dtau of Section 4.3 (0 = every kept document compressed alike).
        reorder: put the kept documents in order of relevance (Section 4.2).
    """

    dynamic: float = 0.3
    reorder: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.dynamic, (int, float)) and 0 <= self.dynamic <= 1):
            raise ValueError(f"LongLLMLingua: dynamic must be in [0, 1], got {self.dynamic!r}")

    def document_scores(self, context: Tensor, docs: Tensor, question: Optional[Tensor], model: Model) -> Tensor:
        if question is None:
            return super().document_scores(context, docs, question, model)
        tail = question
        if model.tokenizer is not None:
            restrict = model.tokenizer(RESTRICT, add_special_tokens=False, return_tensors="pt").input_ids
            tail = torch.cat([question, restrict.to(question.dtype)], dim=1)
        scores = []
        for d in range(int(docs.max()) + 1):  # Eq. 2: mean log p of question + restriction given the document
            lp = model.logprobs(torch.cat([context[:, docs == d], tail.to(context.device)], dim=1))[0]
            scores.append(lp[-tail.shape[1]:].double().mean())
        return torch.stack(scores)

    def order(self, kept_docs: Tensor, scores: Tensor, question: Optional[Tensor]) -> Tensor:
        if question is None or not self.reorder:
            return kept_docs
        return kept_docs[torch.argsort(-scores[kept_docs], stable=True)]

    def share(self, docs: Tensor, kept: Tensor, scores: Tensor, question: Optional[Tensor]) -> Optional[Tensor]:
        if question is None or self.dynamic == 0:
            return None
        rank = torch.argsort(torch.argsort(-scores[kept], stable=True))  # 0 = the kept document most relevant
        frac = dynamic_ratios(rank, len(kept), 1 / self.ratio, self.dynamic)
        sizes = torch.bincount(docs, minlength=len(scores))[kept]
        return torch.repeat_interleave(frac, sizes)  # in the order the kept documents are given

    def token_score(self, question: Optional[Tensor], model: Model) -> Callable[[Tensor, Tensor], Tensor]:
        return super().token_score(question, model) if question is None else contrastive_perplexity(model, question)
