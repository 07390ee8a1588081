"""Random eviction: keep a uniformly random subset of the tokens, the floor every scorer must beat.

Paper: none (a baseline); kvpress's RandomPress is the same idea.
Official code: https://github.com/NVIDIA/kvpress (`kvpress/presses/random_press.py`)
Deviations: the random score of a token is a fixed function of (seed, layer, KV head, position among the
row's real tokens), so a left-padded batch keeps the same tokens as each row alone, and a run is repeatable;
kvpress draws fresh scores from torch's global generator per call (given a seed, from a generator re-seeded on
every call, so every layer keeps the same positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step
from reference_impls.eviction.base import EvictionMethod

__all__ = ["RandomEviction", "random_scores"]


def random_scores(positions: Tensor, seed: int, layer_idx: int) -> Tensor:
    """positions (B, H_kv, T), -1 for holes -> (B, H_kv, T) uniform [0, 1) scores, -inf for holes.

    Scores come from a table drawn with torch.Generator seeded by (seed, layer), indexed by (head, position).
    """
    H_kv, n = positions.shape[1], int(positions.max()) + 1
    g = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
    table = torch.rand(max(n, 1), H_kv, generator=g).T.to(positions.device)  # (H_kv, n); draw p*H_kv+h: n-free
    s = torch.gather(table.expand(positions.shape[0], -1, -1), 2, positions.clamp(min=0))
    return s.masked_fill(positions < 0, float("-inf"))


@dataclass
class RandomEviction(EvictionMethod):
    """A seeded random subset per layer and head; compresses the prefill only.

    Args:
        ratio: target tokens seen / tokens kept.
        budget: absolute tokens kept per layer and head; overrides ratio.
        seed: int >= 0; the same seed keeps the same positions.
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"RandomEviction: seed must be an int >= 0, got {self.seed!r}")

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return random_scores(step.positions, self.seed, step.layer_idx)
