"""SnapKV: the last prompt tokens (the observation window) vote, by attention, for the prefix tokens to keep.

Paper: Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are Looking
for Before Generation", arXiv 2404.14469 (NeurIPS 2024), Section 4 and its PyTorch-style listing: window
attention summed over the window's queries, 1-D pooling, top-k per head, concatenated with the window itself.
Official code: https://github.com/FasterDecoding/SnapKV (`snapkv/monkeypatch/snapkv_utils.py`)
Deviations: (1) GQA: the official code expands keys/values to one copy per query head before selecting
(its cache is G times larger); we store one copy per KV head and average the G query heads' pooled scores
within each group, as kvpress's SnapKVPress does (see FasterDecoding/SnapKV issue #22). (2) A budget below the
window keeps the most recent window tokens (the official code asserts budget > window). The budget, round(n /
ratio) per head, includes the window, as the official `max_capacity_prompt` (our `budget`) does.

Presets (pinned in a test): "kvpress" (default; window 64, kernel 5, avg pooling, checked token for token against
recorded kvpress fixtures) and "paper" (the official code's defaults and LongBench configs: window 32, kernel 7,
max pooling). Explicit knobs override a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Step, attention_probs, repeat_kv
from reference_impls.eviction.base import EvictionMethod

__all__ = ["SnapKV", "snapkv_scores"]


def snapkv_scores(q_obs: Tensor, k: Tensor, scaling: float, *, kernel_size: int = 5, pooling: str = "avg",
                  mask: Optional[Tensor] = None, in_window: Optional[Tensor] = None) -> Tensor:
    """Pooled attention that the observation window gives each prefix key, averaged over each GQA group.

    q_obs (B, H, w, D): the window's queries; k (B, H_kv, T, D). mask (B, H_kv, w, T) bool, True = may attend
    (None: the last w of the T tokens, causal). in_window (B, H_kv, T): the window's own keys, zeroed before
    pooling so only the prefix is pooled (None: the last w keys). Returns (B, H_kv, T), 0 at window keys.
    """
    (B, H, w, _), (H_kv, T) = q_obs.shape, k.shape[1:3]
    if mask is None:  # query i of the window is token T - w + i
        mask = torch.ones(w, T, dtype=torch.bool, device=k.device).tril(T - w).expand(B, H_kv, w, T)
    if in_window is None:
        in_window = (torch.arange(T, device=k.device) >= T - w).expand(B, H_kv, T)
    votes = attention_probs(q_obs, k, mask, scaling).sum(dim=2)  # (B, H, T): summed over the window (Sec. 4)
    window = repeat_kv(in_window, H // H_kv)
    votes = votes.masked_fill(window, 0.0)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d  # Sec. 4: pool to keep clusters of tokens
    votes = pool(votes, kernel_size=kernel_size, stride=1, padding=kernel_size // 2).masked_fill(window, 0.0)
    return votes.view(B, H_kv, H // H_kv, T).mean(dim=2)  # GQA: mean over the group (kvpress)


@dataclass
class SnapKV(EvictionMethod):
    """Keep the observation window plus the prefix tokens it attends to most; compresses the prefill only.

    Args (ratio, budget = the official `max_capacity_prompt`, layers, heads: see EvictionMethod; window included):
        window: the last `window` tokens of the compressed pass vote; also the tokens budget policies reserve.
        kernel_size: odd pooling width. pooling: "avg" or "max".
        preset: "kvpress" (default) or "paper": fills window, kernel_size and pooling left as None.
    """

    window: Optional[int] = None
    kernel_size: Optional[int] = None
    pooling: Optional[str] = None
    preset: str = "kvpress"

    PRESETS = {"kvpress": dict(window=64, kernel_size=5, pooling="avg"), "paper": dict(window=32, kernel_size=7, pooling="max")}

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in self.PRESETS:
            raise ValueError(f"{type(self).__name__}: preset must be one of {', '.join(self.PRESETS)}, got {self.preset!r}")
        for knob, value in self.PRESETS[self.preset].items():
            setattr(self, knob, value if getattr(self, knob) is None else getattr(self, knob))
        for knob, ok, allowed in (("window", isinstance(self.window, int) and self.window >= 1, "an int >= 1"),
                                  ("kernel_size", isinstance(self.kernel_size, int) and self.kernel_size % 2 == 1
                                   and self.kernel_size >= 1, "an odd int >= 1"),
                                  ("pooling", self.pooling in ("avg", "max"), "'avg' or 'max'")):
            if not ok:
                raise ValueError(f"SnapKV: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        obs = step.last(self.window)  # the observation window's queries (a padding query sees nothing)
        w = obs.q_len
        pos = step.positions  # (B, H_kv, T), -1 for holes and padding
        in_window = step.valid & (pos >= (step.n_real() - w)[:, None, None])
        votes = snapkv_scores(obs.queries, step.keys, step.scaling, kernel_size=self.kernel_size,
                              pooling=self.pooling, mask=obs.mask, in_window=in_window)
        # the window is always kept, most recent first if the budget cannot hold all of it
        return torch.where(in_window, (w + 1 + pos).to(votes.dtype), votes)
