"""A selective state-space layer in the style of Mamba: the step size, B and C are computed from each token.

The cache is the SSM state (B, d_inner, d_state) plus the last k-1 inputs of the short causal convolution
(B, d_inner, k-1): a fixed size, whatever the sequence length.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752: Algorithm 2
(selective SSM: Δ = softplus(Parameter + s_Δ(x)), B = s_B(x), C = s_C(x)); Eq. (4) zero-order hold Ā = exp(ΔA),
B̄ = (ΔA)^-1 (exp(ΔA) - I) ΔB, which the official code simplifies to B̄ ≈ ΔB (so do we); Eq. (2a, 2b) the
recurrence h_t = Ā h_(t-1) + B̄ x_t, y_t = C h_t; Figure 3 the block (in_proj to x and gate z, causal depthwise
conv, SiLU, SSM, y ⊙ SiLU(z), out_proj); Section 3.6: real A = -(1..N) (S4D-real init). From the official code:
Δ starts log-uniform in [0.001, 0.1], dt_rank = ceil(d_model / 16), the skip D.
Official code: https://github.com/state-spaces/mamba

The parallel form is `linear_scan`, a work-efficient parallel scan of h_t = Ā_t h_(t-1) + B̄_t x_t, the kind of scan
Section 3.3.2 names for the recurrence; decoding applies Eq. (2a, 2b) once per token. Why not the two alternatives:
cumulative sums in log space write h_t = exp(L_t) Σ_s exp(-L_s) B̄_s x_s with L the running sum of ΔA, and exp(-L_s)
overflows fp32 once the accumulated decay passes e^88 (a few tokens at a large Δ, which is how the layer resets its
state); a chunked scan with explicit pairwise decays (`linear.decay_scan`) is stable but materialises a (C, C, N) decay
per channel and chunk: 4-10x slower than this scan here (CPU, chunks of 8-16, B 32, T 128, d_inner 128, fwd+bwd).

Deviations: (1) no hardware-aware fused kernel (Section 3.3): Ā and B̄ x are materialised as (B, T, d_inner, N)
tensors. (2) Blocks go through TinyLM's [RMSNorm, mixer, RMSNorm, MLP] layer: the paper's Mamba stacks the block alone,
without an MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache
from reference_impls.base import UNIT_BYTES

__all__ = ["Mamba", "cache_bytes", "causal_conv", "linear_scan", "make"]


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """h_t = a_t ⊙ h_(t-1) + b_t for every t at once: a, b (B, T, ...), h0 (B, ...) or None (zeros) -> h (B, T, ...).

    Work-efficient parallel scan (Blelloch): fold consecutive pairs of steps into one step, scan the half-length
    sequence recursively (odd positions), then finish each even position with one step. Only products of the a's and
    sums appear, so nothing overflows. O(T) work, O(log T) depth.
    """
    if h0 is not None:  # the state carried in enters as part of the first step's input
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], 1)
    T = a.shape[1]
    if T == 1:
        return b
    n = T - T % 2
    a0, a1, b0, b1 = a[:, 0:n:2], a[:, 1:n:2], b[:, 0:n:2], b[:, 1:n:2]
    odd = linear_scan(a1 * a0, a1 * b0 + b1)  # h_1, h_3, ...: two steps composed into one
    even = torch.cat([b0[:, :1], a0[:, 1:] * odd[:, :-1] + b0[:, 1:]], 1)  # h_0, h_2, ...: one step from h_(2i-1)
    h = torch.stack([even, odd], 2).flatten(1, 2)
    return h if n == T else torch.cat([h, a[:, -1:] * h[:, -1:] + b[:, -1:]], 1)


def causal_conv(x: Tensor, conv: nn.Conv1d, state: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time: x (B, T, D), state (B, D, k-1) the k-1 inputs before x (zeros at the
    start) -> y (B, T, D), the new state (B, D, k-1): the last k-1 inputs seen."""
    xt = torch.cat([state, x.transpose(1, 2)], -1)  # (B, D, k-1+T)
    y = F.conv1d(xt, conv.weight, conv.bias, groups=xt.shape[1])  # no padding: output t sees inputs t-k+1 .. t
    return y.transpose(1, 2), xt[..., xt.shape[-1] - state.shape[-1]:]


class Mamba(Mixer):
    """The Mamba block (Figure 3): x (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, cfg: ArchConfig, d_state: int = 16, expand: int = 2, d_conv: int = 4):
        super().__init__()
        for name, val in (("d_state", d_state), ("expand", expand), ("d_conv", d_conv)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        d_in, self.dt_rank = expand * cfg.d_model, math.ceil(cfg.d_model / 16)  # dt_rank: the official default
        self.d_in, self.d_state, self.d_conv = d_in, d_state, d_conv
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_in, bias=False)  # the SSM branch x and the gate z
        self.conv = nn.Conv1d(d_in, d_in, d_conv, groups=d_in)
        self.x_proj = nn.Linear(d_in, self.dt_rank + 2 * d_state, bias=False)  # s_Δ (low rank), s_B, s_C
        self.dt_proj = nn.Linear(self.dt_rank, d_in)
        dt = torch.exp(torch.rand(d_in) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.dt_proj.bias.data = dt + torch.log(-torch.expm1(-dt))  # softplus^-1: Δ starts log-uniform in [1e-3, 0.1]
        A = torch.arange(1, d_state + 1.0).repeat(d_in, 1)  # S4D-real: A = -(1, 2, .., N) in every channel
        self.A_log = nn.Parameter(torch.log(A))  # (d_in, N); A = -exp(A_log) stays negative while training
        self.D = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, cfg.d_model, bias=False)

    def new_cache(self, batch: int) -> MixerCache:
        w = self.out_proj.weight
        return MixerCache({"ssm": w.new_zeros(batch, self.d_in, self.d_state),  # h (B, d_inner, d_state)
                           "conv": w.new_zeros(batch, self.d_in, self.d_conv - 1)})  # last k-1 conv inputs

    def forward(self, x: Tensor, cache: MixerCache | None = None, shared=None) -> Tensor:
        B, T, _ = x.shape
        u, z = self.in_proj(x).chunk(2, -1)  # (B, T, d_in) each
        conv_state = u.new_zeros(B, self.d_in, self.d_conv - 1) if cache is None else cache.held["conv"]
        u, conv_state = causal_conv(u, self.conv, conv_state)
        u = F.silu(u)
        dt, Bs, Cs = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt))  # Δ (B, T, d_in)
        A = -self.A_log.exp()  # (d_in, N): negative, so Ā = exp(ΔA) < 1
        a = torch.exp(dt[..., None] * A)  # Ā_t (B, T, d_in, N), Eq. (4)
        b = (dt * u)[..., None] * Bs[:, :, None]  # B̄_t x_t = Δ_t B_t x_t (B, T, d_in, N)
        h0 = None if cache is None else cache.held["ssm"]
        if T == 1 and h0 is not None:  # decoding: Eq. (2a) for one token
            h = (a[:, 0] * h0 + b[:, 0])[:, None]
        else:
            h = linear_scan(a, b, h0)  # (B, T, d_in, N)
        if cache is not None:
            cache.held.update(ssm=h[:, -1].clone(), conv=conv_state.clone())  # clone: free the (B, T, ...) rest
            cache.seen += T
        y = (h @ Cs[..., None])[..., 0] + self.D * u  # Eq. (2b) y_t = C_t h_t, plus the skip D (B, T, d_in)
        return self.out_proj(y * F.silu(z))


def make(cfg: ArchConfig, d_state: int = 16, expand: int = 2, d_conv: int = 4) -> list[Mixer]:
    """One Mamba block per model layer."""
    return [Mamba(cfg, d_state, expand, d_conv) for _ in range(cfg.n_layers)]


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES, d_state: int = 16, expand: int = 2,
                d_conv: int = 4) -> int:
    """Closed form of one sequence's cache after `seq_len` tokens: L · d_inner · (d_state + d_conv - 1), constant."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    return cfg.n_layers * expand * cfg.d_model * (d_state + d_conv - 1) * dtype_bytes
