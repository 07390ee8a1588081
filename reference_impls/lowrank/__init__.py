"""Low-rank and channel methods: caches that keep every token but fewer dimensions of its keys or values."""

from reference_impls.lowrank.eigen_attention import EigenAttention
from reference_impls.lowrank.palu import Palu
from reference_impls.lowrank.think import ThinK, think_channels, think_prune, think_restore, think_scores

__all__ = ["EigenAttention", "Palu", "ThinK", "think_channels", "think_prune", "think_restore", "think_scores"]
