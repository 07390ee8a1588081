"""TOVA: evict the token that the current (last) query attends to least, heads averaged per layer.

Paper: Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs", arXiv 2401.06104 (EMNLP
2024), Section 3 (Token Omission Via Attention: when the multi-state is full, drop the state with the
lowest attention score of the current query; scores are averaged over the heads so a layer keeps one set).
Official code: https://github.com/schwartz-lab-NLP/TOVA (`src/tova_cache.py`); kvpress: `TOVAPress`.
Deviations: (1) GQA: one set per layer, from the mean over *all* query heads (the paper's head average),
so every KV head keeps the same tokens (kvpress's TOVAPress does the same). (2) The prompt is prefilled with
full attention and then cut to the budget with the last prompt query's attention (as kvpress does);
afterwards each decoded token evicts one token, as in the paper. (3) The budget is round(n / ratio) tokens
at the compressing pass (the paper uses fixed multi-state sizes); it then stays fixed. (4) Like the paper,
the current token is scored too and may itself be dropped; kvpress's TOVAPress always keeps it (its own
comment calls this a slight difference); a recorded kvpress 0.5.5 fixture shows equal scores and kept sets that
differ by that token only (tests/eviction/test_kvpress_fixtures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from reference_impls.base import Step, attention_probs
from reference_impls.eviction.base import EvictionMethod

__all__ = ["TOVA", "tova_scores"]


def tova_scores(q_last: Tensor, k: Tensor, scaling: float, mask: Optional[Tensor] = None) -> Tensor:
    """Attention of the last query, averaged over all H query heads, repeated for each KV head.

    q_last (B, H, 1, D); k (B, H_kv, T, D); mask (B, H_kv, 1, T) bool, True = may attend (None = all).
    Returns (B, H_kv, T).
    """
    p = attention_probs(q_last, k, mask, scaling)[:, :, 0]  # (B, H, T)
    return p.mean(dim=1, keepdim=True).expand(-1, k.shape[1], -1)  # Sec. 3: average over heads


@dataclass
class TOVA(EvictionMethod):
    """Lowest last-query attention out, one token per decoding step once the budget is reached.

    Args:
        ratio: target tokens seen / tokens kept (at the compressing pass; the budget then stays fixed).
        budget: absolute tokens kept per layer (the paper's multi-state size); overrides ratio.
    """

    evict_while_decoding = True

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        last = step.last(1)  # under left padding the last query is real
        return tova_scores(last.queries, step.keys, step.scaling, last.attn_mask)
