"""StreamingLLM: keep a few initial "attention sink" tokens and a window of the most recent ones.

Paper: Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453 (ICLR 2024), Section 3.2 (rolling KV cache with attention sinks), Figure 4.
Official code: https://github.com/mit-han-lab/streaming-llm
Deviations: (1) the prompt is prefilled with full attention and evicted afterwards (as kvpress does),
where the paper streams the prompt through the rolling cache; (2) kept keys keep their original RoPE
positions, where the paper re-assigns positions inside the cache (kvpress's KeyRerotationPress does
that); (3) the budget is round(n / ratio) tokens, sinks included, as in the benchmark seed (arXiv
2407.01527), which sets StreamingLLM's budget proportional to the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["StreamingLLM", "streaming_scores"]


def streaming_scores(positions: Tensor, n_sink: int) -> Tensor:
    """Sinks first, then the most recent: score = position, raised above everything for the first n_sink.

    positions (B, H_kv, T), -1 for empty slots -> scores (B, H_kv, T), -inf for empty slots.
    """
    big = positions.max() + 1 + n_sink
    scores = torch.where(positions < n_sink, big + (n_sink - positions), positions).float()
    return scores.masked_fill(positions < 0, float("-inf"))


@dataclass
class StreamingLLM(EvictionMethod):
    """Attention sinks + recent window; evicts while decoding too, so memory stays at the budget.

    Args:
        ratio: target tokens seen / tokens kept.
        budget: absolute tokens kept (sinks + window); overrides ratio.
        n_sink: initial tokens always kept (the paper uses 4).
    """

    n_sink: int = 4
    evict_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.n_sink, int) and self.n_sink >= 0):
            raise ValueError(f"StreamingLLM: n_sink must be an int >= 0, got {self.n_sink!r}")

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return streaming_scores(step.positions, self.n_sink)
