"""LLMLingua: drop whole documents by perplexity, then the least surprising tokens, segment by segment.

Paper: Huiqiang Jiang, Qianhui Wu, Chin-Yew Lin, Yuqing Yang, Lili Qiu, "LLMLingua: Compressing Prompts for
Accelerated Inference of Large Language Models", EMNLP 2023, arXiv 2310.05736. Algorithm 1 (budget controller:
demonstrations ranked by perplexity under a small LM, kept while within the coarse budget), Algorithm 2 (iterative
token-level prompt compression, ITPC: the prompt is cut into segments; each segment's tokens are scored by
-log p(x_i | compressed previous segments, x_<i in the segment) and those above a threshold gamma_j are kept),
Section 3.4 (distribution alignment of the small LM by instruction tuning).
Official code: https://github.com/microsoft/LLMLingua (`PromptCompressor.compress_prompt`); the presets follow its
defaults: segments of `iterative_size=200` tokens, a coarse budget of the target plus 100 tokens
(`context_budget="+100"`).

Deviations:
- The small LM is the served model itself (`Model.logprobs`), not GPT-2 / LLaMA-7B, and it is not aligned
  (no Section 3.4 instruction tuning).
- "Demonstrations" are the context's documents: runs of whole sentences of ~`doc_tokens` tokens
  (`units.documents`), since a long-context prompt here is one text, not a list of demonstrations.
- gamma_j is the threshold that keeps exactly the segment's share of the fine budget (the official code also
  derives it from the ratio, per segment); the kept total is the target exactly.
- Each segment is scored with a fresh forward over the compressed prefix (the official code reuses the prefix's
  KV cache; the scores are the same).
- Instruction and question are outside the compressed context (the paper compresses them at ratio 1 too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, Model
from reference_impls.prompt.units import documents, fill_budget

__all__ = ["LLMLingua", "itpc_keep", "self_information"]


def self_information(model: Model) -> Callable[[Tensor, Tensor], Tensor]:
    """ITPC's token score: (prefix (1, p), segment (1, s)) -> (s,) -log p(x_i | prefix, segment_<i)."""
    def score(prefix: Tensor, segment: Tensor) -> Tensor:
        return -model.logprobs(torch.cat([prefix, segment], dim=1))[0, prefix.shape[1]:]
    return score


def itpc_keep(ids: Tensor, keep: int, score: Callable[[Tensor, Tensor], Tensor], segment: int = 200,
              share: Optional[Tensor] = None) -> Tensor:
    """Algorithm 2: ids (1, n) -> (n,) bool, `keep` tokens kept. Segment j keeps its share of `keep` (rounded so the
    total is exact): its highest-scoring tokens, scored given the tokens already kept before it. `share` (n,) weighs
    each token's part of the budget (LongLLMLingua's per-document ratios); uniform by default."""
    n = ids.shape[1]
    cum = (torch.ones(n) if share is None else share.double()).cumsum(0)
    out = torch.zeros(n, dtype=torch.bool)
    prefix = ids[:, :0]
    for start in range(0, n, segment):
        end = min(start + segment, n)
        seg = ids[:, start:end]
        k = round(keep * float(cum[end - 1] / cum[-1])) - int(out.sum())  # cumulative share: the total is exact
        if k <= 0:
            continue
        s = score(prefix, seg).float()
        top = s.topk(min(k, end - start)).indices.sort().values  # gamma_j: the k-th largest score of the segment
        out[start + top] = True
        prefix = torch.cat([prefix, seg[:, top]], dim=1)
    return out


@dataclass
class LLMLingua(KVMethod):
    """Coarse-to-fine prompt compression; the cache is the shorter prompt's, uncompressed.

    Args:
        ratio: context tokens / kept context tokens (>= 1).
        segment: ITPC segment length (official `iterative_size`, 200).
        coarse_extra: tokens the document-level budget allows above the target (official `context_budget="+100"`);
            None skips the coarse stage.
        doc_tokens: size of the documents the coarse stage keeps or drops whole.
    """

    ratio: float = 2.0
    segment: int = 200
    coarse_extra: Optional[int] = 100
    doc_tokens: int = 128

    def __post_init__(self):
        name = type(self).__name__
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"{name}: ratio must be a number >= 1, got {self.ratio!r}")
        for knob in ("segment", "doc_tokens"):
            if not (isinstance(getattr(self, knob), int) and getattr(self, knob) >= 1):
                raise ValueError(f"{name}: {knob} must be a positive int, got {getattr(self, knob)!r}")
        if self.coarse_extra is not None and not (isinstance(self.coarse_extra, int) and self.coarse_extra >= 0):
            raise ValueError(f"{name}: coarse_extra must be an int >= 0 or None, got {self.coarse_extra!r}")

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "LLMLingua":
        return cls(**knobs) if "ratio" in knobs else cls(ratio=ratio, **knobs)

    # the two stages; LongLLMLingua overrides their scores --------------------------------------------------
    def document_scores(self, context: Tensor, docs: Tensor, question: Optional[Tensor], model: Model) -> Tensor:
        """Algorithm 1's ranking: each document's perplexity (mean self-information of its tokens), higher = keep."""
        info = -model.logprobs(context)[0].double()
        n_docs = int(docs.max()) + 1
        return torch.zeros(n_docs, dtype=torch.float64).index_add_(0, docs, info) / torch.bincount(docs, minlength=n_docs)

    def token_score(self, question: Optional[Tensor], model: Model) -> Callable[[Tensor, Tensor], Tensor]:
        return self_information(model)

    def order(self, kept_docs: Tensor, scores: Tensor, question: Optional[Tensor]) -> Tensor:
        """The kept documents in the order they are given to the model: the original order."""
        return kept_docs

    def share(self, docs: Tensor, kept: Tensor, scores: Tensor, question: Optional[Tensor]) -> Optional[Tensor]:
        """(n_kept_tokens,) each kept token's weight in the fine budget; None = uniform."""
        return None

    def compress_prompt(self, context: Tensor, question: Optional[Tensor], model: Model) -> Tensor:
        n = context.shape[1]
        budget = max(1, round(n / self.ratio))
        if budget >= n:
            return context
        if model.logprobs is None:
            raise ValueError(f"{type(self).__name__} needs the model's log-probabilities (Model.logprobs)")
        docs = documents(context, model.tokenizer, self.doc_tokens)
        sizes = torch.bincount(docs)
        kept = torch.arange(len(sizes))
        if self.coarse_extra is not None:  # Algorithm 1: whole documents, best first, within target + extra
            scores = self.document_scores(context, docs, question, model)
            keep = fill_budget(scores, sizes, budget + self.coarse_extra)
            kept = self.order(torch.nonzero(keep)[:, 0], scores, question)
        ids = torch.cat([context[:, docs == d] for d in kept.tolist()], dim=1)
        if ids.shape[1] <= budget:
            return ids
        share = None if self.coarse_extra is None else self.share(docs, kept, scores, question)
        fine = itpc_keep(ids, budget, self.token_score(question, model), self.segment, share)  # Algorithm 2
        return ids[:, fine.to(ids.device)]

    def new_layer(self, layer_idx: int, model: Model) -> DenseStore:
        return DenseStore()
