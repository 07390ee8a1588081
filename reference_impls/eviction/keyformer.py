"""Keyformer: keep a recent window plus the "key tokens" ranked by Gumbel-regularised attention, accumulated.

Paper: Adnan, Arunkumar, Jain, Nair, Soloveychik, Kamath, "Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference", arXiv 2403.09054 (MLSys 2024): the cache is a recent window of
w tokens plus the k - w tokens with the highest accumulated score; the score function adds Gumbel(0, 1) noise
zeta to the unnormalised attention logits x and divides by a temperature tau before the softmax,
f(x_i) = exp((x_i + zeta_i) / tau) / sum_j exp((x_j + zeta_j) / tau), accumulated over decoding steps, with tau
growing from tau_init to tau_end over the generation. (Equation and section numbers of the paper could not be
checked here: only the abstract and the official repository's blog/README, which shows the same equation, were
readable.)
Official code: https://github.com/d-matrix-ai/keyformer-llm (`models/*-keyformer-lib`, `_attn`:
`nn.functional.gumbel_softmax(raw_attn, tau=tau_init + itr_count * tau_delta)`, summed over batch and queries
per head, added to the running score; recent window = `recent`% of the cache, the rest top-k of the score;
scripts: kv_cache 60, recent 30, tau_init 1, tau_end 2, tau_delta = (tau_end - tau_init) / max_new_tokens with
max_new_tokens 128).
Deviations: (1) GQA: the official code is for multi-head models; the G query heads of a group draw their own
noise and their scores are averaged, as in our H2O (`h2o_accumulate`); scores are kept per batch row (the
official code sums over the batch). (2) Budget: round(n / ratio) tokens per head at the compressing pass (the
official code: int(kv_cache% of the prompt)); the window is floor(recent_fraction * budget) as there. (3) Noise
is reproducible (see `gumbel_noise`) instead of torch's global generator. (4) The temperature step counts
forward passes since the compressing pass (a multi-token question chunk is one step; the official code restarts
at every multi-token pass) and stops at tau_end after `tau_steps`. (5) Tokens are physically dropped (the
official code masks them); the fp32 score per kept token is counted in nbytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step, repeat_kv
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.h2o import h2o_accumulate, h2o_scores

__all__ = ["Keyformer", "gumbel_noise", "keyformer_scores"]


def keyformer_scores(q: Tensor, k: Tensor, scaling: float, mask: Optional[Tensor] = None, *, tau: float = 1.0,
                     noise: Optional[Tensor] = None) -> Tensor:
    """The paper's score function per query: softmax((x + zeta) / tau) over the keys, x = q k^T * scaling.

    q (B, H, q, D); k (B, H_kv, T, D); mask (B, H_kv, q, T) bool, True = may attend (size-1 dims broadcast;
    None = all); noise (B, H, q, T) Gumbel draws zeta, or None. Returns (B, H, q, T), fully masked rows 0.
    Without noise and with tau = 1 this is `base.attention_probs`, operation for operation.
    """
    B, H, n, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    G = H // H_kv
    # the G query heads of a group against their KV head as one block: no copy of the keys per query head
    x = torch.matmul(q.float().reshape(B, H_kv, G * n, D), k.float().transpose(-1, -2)).mul_(scaling)
    x = x.view(B, H_kv, G, n, T)
    if noise is not None:
        x += noise.view(B, H_kv, G, n, T)  # in place: the prefill's (B, H, T, T) is the largest tensor of the step
    if mask is not None:
        x.masked_fill_(~mask[:, :, None], float("-inf"))  # masked keys get exactly 0, as finfo.min does there
    if tau != 1:
        x /= tau
    p = torch.softmax(x, dim=-1)
    return (p if mask is None else p.nan_to_num_(0.0)).view(B, H, n, T)  # only a masked row can be all -inf


def gumbel_noise(valid: Tensor, q_real: Tensor, num_heads: int, n_real: Tensor, seed: int, layer_idx: int,
                 dense: bool = False) -> Tensor:
    """(B, H, q, T) Gumbel(0, 1) draws zeta = -log(-log U), reproducible and independent of the batch.

    valid (B, H_kv, T) real held keys; q_real (B, q) real queries; n_real (B,) tokens the row has seen. Row b
    draws U as one `torch.rand(H, q_b, T_b)` (q_b real queries, T_b = most valid keys of a KV head; U = 0,
    probability 2**-24 a draw, gives zeta = -inf: weight 0 for that pair) from a torch.Generator seeded with
    ((seed * 1_000_003 + layer_idx) * 1_000_003 + n_real[b]) mod 2**63, and gives the j-th real query and
    the t-th valid key of each head U[:, j, t]: a row gets the same noise alone or left-padded in a batch, and
    every step and layer gets fresh noise. Zero at padding queries. dense: every key valid and every query real.
    """
    B, H_kv, T = valid.shape
    G, q = num_heads // H_kv, q_real.shape[1]
    rows = []
    for b in range(B):  # one generator per row (B is small); no loop over tokens
        g = torch.Generator(device=valid.device)
        g.manual_seed(((seed * 1_000_003 + layer_idx) * 1_000_003 + int(n_real[b])) % 2**63)
        if dense:  # every query real, every key valid (a dense decoding step): the same draws, fewer small ops
            rows.append(torch.rand(num_heads, q, T, generator=g, device=valid.device).log_().neg_().log_().neg_())
            continue
        qi = q_real[b].nonzero().squeeze(-1)
        u = torch.rand(num_heads, len(qi), int(valid[b].sum(-1).max()), generator=g, device=valid.device)
        zeta = u.log_().neg_().log_().neg_()  # in place: a 1.5k-token prefill draws 20M per layer
        if not bool(valid[b].all()):  # holes or padding: spread the draws over the valid keys, in order
            rank = repeat_kv(valid[b:b + 1].long().cumsum(-1) - 1, G)[0].clamp(min=0)  # (H, T)
            zeta = torch.gather(zeta, 2, rank[:, None, :].expand(-1, len(qi), -1))
        if len(qi) < q:  # padding queries draw nothing and get 0
            zeta = torch.zeros(num_heads, q, T, device=valid.device).index_copy_(1, qi, zeta)
        rows.append(zeta)
    return torch.stack(rows) if B > 1 else rows[0][None]  # (B, H, q, T); batch 1 without a copy


@dataclass
class Keyformer(EvictionMethod):
    """Recent window + key tokens by accumulated Gumbel-softmax score; evicts while decoding (one token a step).

    Args:
        ratio: target tokens seen / tokens kept (at the compressing pass; the budget then stays fixed).
        budget: absolute tokens kept per layer and head; overrides ratio.
        recent_fraction: share of the budget for the recent window, floor(share * budget) (official 0.3).
        tau_init, tau_end: temperature at the compressing pass and after `tau_steps` later steps (official 1, 2).
        tau_steps: steps over which tau grows linearly (the official max_new_tokens, 128); then it stays.
        gumbel: add the Gumbel noise (False: with tau 1 the score is H2O's accumulated attention).
        seed: int >= 0 seeding the noise (see `gumbel_noise`): same seed, same kept tokens.

    The temperature follows `Step.since_compress`, the number of forward passes since the compressing pass.
    """

    recent_fraction: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    tau_steps: int = 128
    gumbel: bool = True
    seed: int = 0
    evict_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.recent_fraction, (int, float)) and 0 <= self.recent_fraction <= 1):
            raise ValueError(f"Keyformer: recent_fraction must be a number in [0, 1], got {self.recent_fraction!r}")
        for name in ("tau_init", "tau_end"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"Keyformer: {name} must be a number > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.tau_steps, int) and self.tau_steps >= 1):
            raise ValueError(f"Keyformer: tau_steps must be an int >= 1, got {self.tau_steps!r}")
        if not isinstance(self.gumbel, bool):
            raise ValueError(f"Keyformer: gumbel must be True or False, got {self.gumbel!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"Keyformer: seed must be an int >= 0, got {self.seed!r}")

    def tau(self, t: int) -> float:
        """Temperature t steps after the compressing pass: linear from tau_init to tau_end, then constant."""
        return self.tau_init + (self.tau_end - self.tau_init) * min(t, self.tau_steps) / self.tau_steps

    def observe(self, step: Step, history: Optional[Tensor]) -> Tensor:
        """The accumulated regularised score of every held key, this step's queries included."""
        t = max(step.since_compress, 0)
        B, H_kv, T = step.valid.shape
        noise = None
        if self.gumbel:
            noise = gumbel_noise(step.valid, step.q_real, step.queries.shape[1], step.n_real(), self.seed,
                                 step.layer_idx, dense=step.all_visible)
        f = keyformer_scores(step.queries, step.keys, step.scaling, step.attn_mask, tau=self.tau(t), noise=noise)
        return h2o_accumulate(history, f, H_kv)  # masked keys get 0, so holes stay 0 (as in H2O)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        # floor like the official int(req * recent / 100); the epsilon keeps e.g. 0.29 * 100 from flooring to 28
        n_recent = (budget.double() * self.recent_fraction + 1e-9).floor().long()
        return h2o_scores(history, step.positions, step.n_real(), n_recent)
