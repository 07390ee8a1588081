"""Linear attention with a per-head exponential decay (RetNet's retention); GLA's data-dependent gates as a knob.

The cache is a state S of shape (B, H, D, D) per layer that the new tokens fold into; nothing per token is kept,
so its bytes do not grow with the sequence.

Paper: Sun et al., "Retentive Network: A Successor to Transformer for Large Language Models", arXiv 2307.08621:
Eq. (5) parallel form (Q K^T ⊙ D) V with D_nm = γ^(n-m) for n ≥ m; Eq. (6) recurrent form
S_n = γ S_(n-1) + K_n^T V_n, o_n = Q_n S_n; Eq. (7) chunkwise form; Eq. (8) gated multi-scale retention
(γ = 1 - 2^(-5-h) per head, GroupNorm per head, swish output gate).
`gated=True`: Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv 2312.06635,
Section 4: S_t = Diag(α_t) S_(t-1) + k_t^T v_t with α_t = σ(x_t W_α1 W_α2 + b)^(1/τ), τ = 16, W_α of rank 16.
Official code: https://github.com/microsoft/torchscale (RetNet),
https://github.com/fla-org/flash-linear-attention (GLA).

`decay_scan` is the parallel form: the chunkwise form (Eq. 7, GLA's chunk form), which builds each chunk's pairwise
decays from s to t (s ≤ t) explicitly, so every exponent is ≤ 0 and nothing overflows, and carries the state from
chunk to chunk. With a per-head decay (last axis 1) a chunk is exactly Eq. (5), so a sequence no longer than `chunk`
(64 by default) runs the fully parallel form. `decay_step` is Eq. (6), used to decode.

Deviations: (1) RoPE (`cfg.rope_base`, halves rotated) stands in for RetNet's xPos-style rotation Θ; GLA uses none.
(2) Value dimension = key dimension = `cfg.head_dim` (RetNet doubles the value width). (3) No score normalisation of
the parallel form (Section 2.2): GroupNorm makes the output invariant to it up to its eps. (4) GLA is this same layer
with its gates in place of γ and no rotation: its swish output gate and per-head norm are RetNet's (GroupNorm here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache, rope
from reference_impls.base import UNIT_BYTES

__all__ = ["Retention", "cache_bytes", "decay_scan", "decay_step", "make"]


def decay_scan(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, state: Tensor | None = None, chunk: int = 64):
    """S_t = Diag(exp(log_a_t)) S_(t-1) + k_t^T v_t, o_t = q_t S_t over a whole sequence, chunk by chunk.

    q, k (B, H, T, K); v (B, H, T, V); log_a (B or 1, H, T, K or 1) ≤ 0; state (B, H, K, V) or None (zeros)
    -> o (B, H, T, V), the state after the last token (B, H, K, V).
    """
    B, H, T, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state
    out = []
    for c0 in range(0, T, chunk):
        qc, kc, vc, la = (x[:, :, c0:c0 + chunk] for x in (q, k, v, log_a))  # la (.., C, K|1)
        C = qc.shape[2]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        later = causal.tril(-1)  # later[j, s]: token j comes after token s
        # seg[t, s] = sum of la over (s, t], summed term by term: a difference of running sums cancels badly
        # once they are large (GLA's gates can be), costing ~1e-5 relative error in fp32
        seg = la[:, :, :, None].expand(*la.shape[:3], C, la.shape[-1]).masked_fill(~later[:, :, None], 0).cumsum(2)
        decay = seg.masked_fill(~causal[:, :, None], float("-inf")).exp()  # (.., C, C, K|1): from s to t, 0 if s > t
        if la.shape[-1] == 1:  # one decay per head: (Q K^T ⊙ D), Eq. (5)
            scores = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
        else:  # one decay per key channel (GLA): the decay sits inside the dot product
            scores = (qc[:, :, :, None] * kc[:, :, None] * decay).sum(-1)
        b = la.cumsum(2)  # (.., C, K|1): decay from the chunk's start through t
        out.append(scores @ vc + (qc * b.exp()) @ state)  # within the chunk + what the state carries in
        state = b[:, :, -1:].transpose(-1, -2).exp() * state + (kc * seg[:, :, -1].exp()).transpose(-1, -2) @ vc
    return torch.cat(out, 2), state


def decay_step(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, state: Tensor):
    """One token of the recurrence (Eq. 6): q, k (B, H, 1, K), v (B, H, 1, V), log_a (B or 1, H, 1, K or 1),
    state (B, H, K, V) -> o (B, H, 1, V), new state (B, H, K, V)."""
    state = log_a.transpose(-1, -2).exp() * state + k.transpose(-1, -2) @ v
    return q @ state, state


class Retention(Mixer):
    """Gated multi-scale retention (Eq. 8), or gated linear attention with `gated=True`: x (B, T, d_model) -> same."""

    def __init__(self, cfg: ArchConfig, gated: bool = False, chunk: int | None = None, gate_rank: int = 16,
                 tau: float = 16.0):
        super().__init__()
        # a decay per key channel costs a (C, C, D) tensor per chunk: keep those chunks short
        chunk = (16 if gated else 64) if chunk is None else chunk
        if chunk < 1 or gate_rank < 1 or tau <= 0:
            raise ValueError(f"chunk and gate_rank must be >= 1 and tau > 0, got {chunk}, {gate_rank}, {tau}")
        H, D = cfg.n_heads, cfg.head_dim
        self.cfg, self.gated, self.chunk, self.tau = cfg, gated, chunk, tau
        self.qkvg = nn.Linear(cfg.d_model, 4 * H * D, bias=False)  # queries, keys, values, output gate
        self.norm = nn.GroupNorm(H, H * D)  # Eq. (8): heads decay at different rates, so normalise each alone
        self.out = nn.Linear(H * D, cfg.d_model, bias=False)
        if gated:  # GLA: low-rank projection to one forget gate per key channel
            self.alpha = nn.Sequential(nn.Linear(cfg.d_model, gate_rank, bias=False), nn.Linear(gate_rank, H * D))
        else:  # Eq. (8): γ_h = 1 - 2^(-5-h), multi-scale memory spans of about 32 to 2^(4+H) tokens
            self.register_buffer("log_gamma", torch.log1p(-2.0 ** (-5.0 - torch.arange(H))), persistent=False)

    def new_cache(self, batch: int) -> MixerCache:
        H, D = self.cfg.n_heads, self.cfg.head_dim
        return MixerCache({"state": self.out.weight.new_zeros(batch, H, D, D)})  # S (B, H, D_k, D_v)

    def forward(self, x: Tensor, cache: MixerCache | None = None, shared=None) -> Tensor:
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        q, k, v, g = self.qkvg(x).view(B, T, 4, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        k = k * D ** -0.5
        if self.gated:  # log α_t = log σ(.) / τ: a forget gate per key channel, driven by the token
            log_a = F.logsigmoid(self.alpha(x)).view(B, T, H, D).transpose(1, 2) / self.tau
        else:
            pos = torch.arange(T, device=x.device) + (cache.seen if cache is not None else 0)
            q, k = rope(q, pos, self.cfg.rope_base), rope(k, pos, self.cfg.rope_base)
            log_a = self.log_gamma.view(1, H, 1, 1).expand(1, H, T, 1)
        if cache is None:
            o, _ = decay_scan(q, k, v, log_a, chunk=self.chunk)
        else:
            S = cache.held["state"]
            o, S = decay_step(q, k, v, log_a, S) if T == 1 else decay_scan(q, k, v, log_a, S, self.chunk)
            cache.held["state"] = S
            cache.seen += T
        o = self.norm(o.transpose(1, 2).reshape(B * T, H * D)).view(B, T, H * D)
        return self.out(F.silu(g.transpose(1, 2).reshape(B, T, H * D)) * o)


def make(cfg: ArchConfig, gated: bool = False) -> list[Mixer]:
    """One retention layer (or GLA layer with `gated=True`) per model layer."""
    return [Retention(cfg, gated=gated) for _ in range(cfg.n_layers)]


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES) -> int:
    """Closed form of one sequence's cache after `seq_len` tokens: L · H · D · D states, whatever `seq_len`."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    return cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.head_dim * dtype_bytes
