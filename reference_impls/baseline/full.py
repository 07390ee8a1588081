"""Full cache: every token's keys and values at the model's precision; the baseline of every comparison.

Paper: Vaswani et al., "Attention Is All You Need", arXiv 1706.03762 (incremental decoding caches the
keys and values of past tokens).
Official code: none needed; transformers' DynamicCache holds the same tensors.
Deviations: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference_impls.base import DenseStore, KVMethod, Model

__all__ = ["Full"]


@dataclass
class Full(KVMethod):
    """No compression: a DenseStore per layer."""

    def new_layer(self, layer_idx: int, model: Model) -> DenseStore:
        return DenseStore()

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "Full":
        """The full cache, whatever the target: it is the 1x every ratio is measured against."""
        return cls(**knobs)
