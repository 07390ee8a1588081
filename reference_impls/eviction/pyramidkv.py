"""PyramidKV: the same total budget as uniform eviction, spread as a pyramid: most tokens in the lowest layer.

Paper: Zefan Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069, Section 3 (budgets decrease arithmetically from the bottom layer to the top; tokens inside
each layer chosen by SnapKV-style window attention).
Official code: https://github.com/Zefan-Cai/KVCache-Factory (`PyramidKVCluster` in `pyramidkv/pyramidkv_utils.py`)

PyramidKV is SnapKV with the `Pyramid` layer policy (`policies.py` holds the schedule); any other scorer takes
the same policy (`KNorm(layers="pyramid")`). Deviations: (1) the schedule is the official one computed in
floating point and rounded by largest remainder, so the layers' budgets add up to exactly L * b (see
`pyramid_budgets`). (2) Like the official code, every layer reserves the scorer's window on top of its share,
and the schedule falls back to uniform budgets when the pyramid does not fit: when the budget is at most the
window (b <= w: from about n / w x on, e.g. 1.5k tokens with window 32 above ~47x) or when the prompt is
shorter than 2 (b - w) (the official `q_len < (max_capacity_prompt - window_size) * 2` branch: at 1.5k tokens
and window 64 every ratio below ~1.84x is uniform). kvpress's PyramidKVPress
spreads n (1 - r) with no reservation and falls back whenever its top layer would keep fewer tokens than the
window (60 tokens, window 8, r = 0.75: kvpress keeps 15 + 15, we keep 22 + 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reference_impls.eviction.policies import Pyramid
from reference_impls.eviction.snapkv import SnapKV

__all__ = ["PyramidKV"]


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with per-layer budgets in a pyramid (`layers=Pyramid(beta)`, official beta 20); the total over
    layers equals the uniform total. Takes SnapKV's knobs and presets."""

    layers: Any = field(default_factory=Pyramid)
