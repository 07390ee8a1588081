"""A hybrid in the style of Griffin: two RG-LRU recurrent blocks, then one local multi-query attention block, repeated.

The cache is, per recurrent layer, the state h (B, d_rnn) and the last k-1 conv inputs (B, d_rnn, k-1); per
attention layer, the keys and values of the last `cfg.window` tokens of its one KV head. Beyond the window its
bytes no longer grow.

Paper: De et al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models",
arXiv 2402.19427: Section 2 and Figure 2 (residual blocks; the pattern of two recurrent blocks then one local MQA
block; the recurrent block = GeLU(Linear x) ⊙ RG-LRU(Conv1D(Linear x)), then Linear); Section 2.4, Eq. (1)-(4), the
RG-LRU: r_t = σ(W_a x_t + b_a), i_t = σ(W_x x_t + b_x), a_t = a^(c r_t) with a = σ(Λ) and c = 8,
h_t = a_t ⊙ h_(t-1) + sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t); a_t is computed in log space, log a_t = -c r_t softplus(-Λ);
Λ is initialised so that a^c is uniform in [0.9, 0.999].
Official code: https://github.com/google-deepmind/recurrentgemma (as there, the derivative of sqrt(1 - a_t²) is
capped: `sqrt_bounded_grad`)

The parallel form is the parallel scan `mamba.linear_scan` over the diagonal recurrence (Eq. 4); decoding applies
Eq. (4) once per token. The local attention is `mha.Attention` with one KV head and a window (its cache keeps the
last `window` tokens).

Deviations: (1) the MLP of each residual block is TinyLM's SwiGLU (the paper uses a gated GeLU MLP). (2) W_a and W_x
are dense (the official code makes them block-diagonal, one block per head). (3) d_rnn = d_model by default (the
paper uses 4/3 d_model). (4) No reset of the recurrence at document boundaries (the official code drops the
sqrt(1 - a²) factor on a segment's first token); one sequence here is one document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache
from reference_impls.architectures.mamba import causal_conv, linear_scan
from reference_impls.architectures.mha import Attention
from reference_impls.base import UNIT_BYTES

__all__ = ["MAX_SQRT_GRAD", "RecurrentBlock", "cache_bytes", "is_attention", "make", "sqrt_bounded_grad"]

#: the official code's cap on the derivative of sqrt(1 - a_t²) (recurrentgemma's SqrtBoundDerivative)
MAX_SQRT_GRAD = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g / (4 * x).clamp_min(MAX_SQRT_GRAD ** -2).sqrt()  # 1/(2 sqrt x), at most MAX_SQRT_GRAD


def sqrt_bounded_grad(x: Tensor) -> Tensor:
    """sqrt(x), x >= 0, whose derivative 1/(2 sqrt x) is capped at MAX_SQRT_GRAD, as the official code does.

    Why: when the recurrence gate r_t saturates to 0, a_t -> 1 and 1 - a_t² -> 0, where the plain derivative is
    infinite; times sigmoid's zero slope it makes NaN gradients that poison the whole step (seen at lr 1e-2)."""
    return _SqrtBoundedGrad.apply(x)


class RecurrentBlock(Mixer):
    """Griffin's recurrent block (Figure 2): x (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, cfg: ArchConfig, d_rnn: int | None = None, d_conv: int = 4, c: float = 8.0):
        super().__init__()
        d_rnn = d_rnn or cfg.d_model
        if d_rnn < 1 or d_conv < 1 or c <= 0:
            raise ValueError(f"d_rnn and d_conv must be >= 1 and c > 0, got {d_rnn}, {d_conv}, {c}")
        self.d_rnn, self.d_conv, self.c = d_rnn, d_conv, c
        self.gate_branch, self.rnn_branch = nn.Linear(cfg.d_model, d_rnn), nn.Linear(cfg.d_model, d_rnn)
        self.conv = nn.Conv1d(d_rnn, d_rnn, d_conv, groups=d_rnn)
        self.w_a = nn.Linear(d_rnn, d_rnn)  # recurrence gate, Eq. (1)
        self.w_x = nn.Linear(d_rnn, d_rnn)  # input gate, Eq. (2)
        a = torch.empty(d_rnn).uniform_(0.9, 0.999) ** (1 / c)  # a^c uniform in [0.9, 0.999]
        self.lam = nn.Parameter(torch.log(a / (1 - a)))  # Λ with σ(Λ) = a
        self.out = nn.Linear(d_rnn, cfg.d_model)

    def new_cache(self, batch: int) -> MixerCache:
        w = self.out.weight
        return MixerCache({"h": w.new_zeros(batch, self.d_rnn),  # the RG-LRU state (B, d_rnn)
                           "conv": w.new_zeros(batch, self.d_rnn, self.d_conv - 1)})  # last k-1 conv inputs

    def forward(self, x: Tensor, cache: MixerCache | None = None, shared=None) -> Tensor:
        B, T, _ = x.shape
        conv_state = x.new_zeros(B, self.d_rnn, self.d_conv - 1) if cache is None else cache.held["conv"]
        u, conv_state = causal_conv(self.rnn_branch(x), self.conv, conv_state)  # (B, T, d_rnn)
        r, i = torch.sigmoid(self.w_a(u)), torch.sigmoid(self.w_x(u))  # Eq. (1), (2)
        log_a = -self.c * r * F.softplus(-self.lam)  # Eq. (3) in log space: log a_t = c r_t log σ(Λ)
        b = sqrt_bounded_grad(-torch.expm1(2 * log_a)) * (i * u)  # sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t): keeps h at unit scale
        h0 = None if cache is None else cache.held["h"]
        if T == 1 and h0 is not None:  # decoding: Eq. (4) for one token
            h = (log_a[:, 0].exp() * h0 + b[:, 0])[:, None]
        else:
            h = linear_scan(log_a.exp(), b, h0)  # (B, T, d_rnn)
        if cache is not None:
            cache.held.update(h=h[:, -1].clone(), conv=conv_state.clone())  # clone: free the (B, T, ...) rest
            cache.seen += T
        return self.out(F.gelu(self.gate_branch(x)) * h)


def is_attention(layer: int) -> bool:
    """The paper's pattern: recurrent, recurrent, local attention, recurrent, recurrent, local attention, ..."""
    return layer % 3 == 2


def make(cfg: ArchConfig, d_rnn: int | None = None, d_conv: int = 4) -> list[Mixer]:
    """Recurrent blocks, every third layer a local MQA block (one KV head, `cfg.window` most recent tokens)."""
    return [Attention(cfg, n_kv_heads=1, window=cfg.window) if is_attention(i) else RecurrentBlock(cfg, d_rnn, d_conv)
            for i in range(cfg.n_layers)]


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES, d_rnn: int | None = None,
                d_conv: int = 4) -> int:
    """Closed form of one sequence's cache after `seq_len` tokens: recurrent layers d_rnn · d_conv each (h and the
    k-1 conv inputs), attention layers 2 · 1 · D · min(seq_len, window) each."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    n_attn = sum(is_attention(i) for i in range(cfg.n_layers))
    recurrent = (cfg.n_layers - n_attn) * (d_rnn or cfg.d_model) * d_conv
    return (recurrent + n_attn * 2 * cfg.head_dim * min(seq_len, cfg.window)) * dtype_bytes
