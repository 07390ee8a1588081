"""KeyDiff: keep the keys that differ most from the average key (query-agnostic, no attention needed).

Paper: Park, Jones, Morse, Goel, Lee, Lott, "KeyDiff: Key Similarity-Based KV Cache Eviction for
Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364, Section 3 (the score of a
key is its negative cosine similarity to an anchor, the mean of the cache's normalised keys).
Official code: none found; the reference used is kvpress's KeyDiffPress (https://github.com/NVIDIA/kvpress).
Deviations: (1) like kvpress, the whole prompt is scored once after the prefill; the paper evicts block by
block while the prompt is processed, so its anchor is recomputed over each block's cache. (2) The anchor is
the mean over each row's real (non-padding, non-empty) keys, so batches with left padding match batch 1.
GQA: scores are per KV head (keys only), nothing to aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["KeyDiff", "keydiff_scores"]


def keydiff_scores(k: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """-cos(k_j, anchor), anchor = mean of the normalised valid keys of the (row, head).

    k (B, H_kv, T, D), valid (B, H_kv, T) bool or None (all valid) -> (B, H_kv, T), higher = more distinct.
    """
    kn = F.normalize(k.float(), p=2, dim=-1)
    if valid is None:
        anchor = kn.mean(dim=2, keepdim=True)
    else:
        w = valid[..., None].float()
        anchor = (kn * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp(min=1)
    return -F.cosine_similarity(kn, anchor, dim=-1)


@dataclass
class KeyDiff(EvictionMethod):
    """Keep the round(n / ratio) most distinctive keys per head; compresses the prefill only.

    Args:
        ratio: target tokens seen / tokens kept.
        budget: absolute tokens kept per layer and head; overrides ratio.
    """


    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return keydiff_scores(step.keys, step.valid)
