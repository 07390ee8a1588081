"""Expected Attention: keep the keys that queries still to come are expected to attend to, weighted by value norm.

Paper: Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", arXiv 2510.00636, Section 3: pre-RoPE queries are modelled as a Gaussian N(mu, Sigma)
estimated from the prompt; the RoPE rotation averaged over the next n_future positions, R = mean_j R_j, gives the
future query distribution N(R mu, R Sigma R^T); a key's expected exponentiated logit then has the closed form
    E[exp(s q.k)] = exp(s (R mu).k + s^2 / 2 k^T (R Sigma R^T) k)        (s = 1/sqrt(d), the Gaussian's m.g.f.)
normalised over the keys (the expected attention weight), and the score of a pair is that weight times ||v||
(its expected contribution to the residual stream, up to W_o).
Official code: https://github.com/NVIDIA/kvpress (`kvpress/presses/expected_attention_press.py`,
`ExpectedAttentionPress`; the derivation in `notebooks/expected_attention.ipynb`).
Presets: the defaults of ExpectedAttentionPress (n_future_positions=512, n_sink=4, use_covariance=True,
use_vnorm=True, epsilon=0).
Deviations: (1) compresses at the compressing pass (the prefill) only, as ExpectedAttentionPress does; the
paper's decoding-time mode (kvpress's DecodingPress wrapper, statistics from a buffer of recent hidden states)
is not implemented. (2) Pre-RoPE queries are recovered by undoing RoPE on the queries attention used (exact:
RoPE is a rotation, times the model's attention scaling if any) instead of re-projecting hidden states with
W_q as kvpress does; the same numbers (a test checks against q_proj). (3) s is the model's attention scaling
(1/sqrt(d) for Llama-style models, as in kvpress). (4) With left padding each row's statistics use its own real
queries and its future positions start at its own length. (5) Sinks are kept by a score above every other key of
their row (kvpress: above the whole batch's maximum), so a padded batch keeps what each row keeps alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.quantization.kvquant import apply_rope  # x cos + rotate_half(x) sin, and its inverse

__all__ = ["ExpectedAttention", "expected_attention_scores", "query_statistics"]


def query_statistics(q_pre: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (B, H, D) and covariance (B, H, D, D) of the pre-RoPE queries q_pre (B, H, q, D) over the q positions
    where weight (B, q) is True (divided by their count, as kvpress does)."""
    w = weight[:, None, :, None].float()  # (B, 1, q, 1)
    n = w.sum(2).clamp(min=1)  # (B, 1, 1)
    mu = (q_pre.float() * w).sum(2) / n
    centred = (q_pre.float() - mu[:, :, None]) * w
    return mu, centred.transpose(-1, -2) @ centred / n[..., None]


def expected_attention_scores(mu: Tensor, cov: Optional[Tensor], k: Tensor, v: Tensor, cos_f: Tensor, sin_f: Tensor,
                              scaling: float, *, key_mask: Optional[Tensor] = None, use_vnorm: bool = True,
                              epsilon: float = 0.0) -> Tensor:
    """Expected attention of the future queries to each key, averaged over each GQA group, times ||v||.

    mu (B, H, D), cov (B, H, D, D) or None: pre-RoPE query statistics; k, v (B, H_kv, T, D), k after RoPE;
    cos_f, sin_f (B, F, D): the model's RoPE at the F future positions; key_mask (B, H_kv, T) bool: the keys that
    share the softmax (None: all). Returns (B, H_kv, T), 0 where key_mask is False.
    """
    (B, H, D), (H_kv, T) = mu.shape, k.shape[1:3]
    G = H // H_kv
    c, s = cos_f.float().mean(1)[:, None], sin_f.float().mean(1)[:, None]  # (B, 1, D): R = mean_j R_j
    mu_f = apply_rope(mu.float(), c, s)  # R mu
    kg = k.float()[:, :, None].expand(B, H_kv, G, T, D).reshape(B, H, T, D)  # each query head's keys
    logits = scaling * (kg @ mu_f[..., None]).squeeze(-1)  # (B, H, T)
    if cov is not None:  # + s^2 / 2 k^T (R Sigma R^T) k: R applied to the rows, then to the columns
        cov_f = apply_rope(apply_rope(cov.float(), c[:, :, None], s[:, :, None]).transpose(-1, -2),
                           c[:, :, None], s[:, :, None])
        logits = logits + scaling ** 2 / 2 * ((kg @ cov_f) * kg).sum(-1)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.repeat_interleave(G, 1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # the expected attention weight, per query head
    scores = probs.view(B, H_kv, G, T).mean(2)  # GQA: mean over the group (kvpress)
    if use_vnorm:  # expected contribution to the residual stream (without W_o)
        scores = (scores + epsilon) * v.float().norm(dim=-1)
    return scores if key_mask is None else scores.masked_fill(~key_mask, 0.0)


@dataclass
class ExpectedAttention(EvictionMethod):
    """Keep the pairs with the highest expected future attention (times ||v||) plus n_sink sinks; prefill only.

    Args (ratio, budget, layers, heads: see EvictionMethod):
        n_future_positions: future positions whose RoPE rotation is averaged (>= 1).
        n_sink: first tokens always kept and left out of the statistics and the softmax (>= 0).
        use_covariance: include the query covariance term; else the mean alone.
        use_vnorm: multiply by the value norm. epsilon: added to the weight before that (>= 0).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (
                ("n_future_positions", isinstance(self.n_future_positions, int) and self.n_future_positions >= 1,
                 "an int >= 1"),
                ("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0"),
                ("use_covariance", isinstance(self.use_covariance, bool), "True or False"),
                ("use_vnorm", isinstance(self.use_vnorm, bool), "True or False"),
                ("epsilon", isinstance(self.epsilon, (int, float)) and self.epsilon >= 0, "a number >= 0")):
            if not ok:
                raise ValueError(f"ExpectedAttention: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        bound = replace(self)
        bound._rope = model.rope  # the model's own cos/sin: to undo RoPE on queries and rotate to future positions
        return EvictingStore(bound, layer_idx, model)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        rope = getattr(self, "_rope", None)
        if rope is None:
            raise ValueError("ExpectedAttention needs the model's rotary embedding (Model.rope), which this model does "
                             "not expose; build the cache with KVCache(model, method) on a RoPE model")
        q, qpos = step.queries, step.q_positions
        cos, sin = (t.to(q.device) for t in rope(qpos.clamp(min=0)))  # (B, q, D)
        q_pre = apply_rope(q.float(), cos[:, None], sin[:, None], inverse=True)  # (B, H, q, D) before RoPE
        mu, cov = query_statistics(q_pre, step.q_real & (qpos >= self.n_sink))  # sinks hold outliers (kvpress)
        future = step.n_real()[:, None] + torch.arange(self.n_future_positions, device=q.device)  # (B, F)
        cos_f, sin_f = (t.to(q.device) for t in rope(future))
        competing = step.valid & (step.positions >= self.n_sink)
        scores = expected_attention_scores(mu, cov if self.use_covariance else None, step.keys, step.values, cos_f,
                                           sin_f, step.scaling, key_mask=competing, use_vnorm=self.use_vnorm,
                                           epsilon=self.epsilon)
        top = scores.flatten(1).max(1).values[:, None, None]  # (B, 1, 1): each row's best non-sink score
        sink = step.valid & (step.positions < self.n_sink)
        return torch.where(sink, top + 1 + (self.n_sink - step.positions), scores)  # sinks first, earliest first
