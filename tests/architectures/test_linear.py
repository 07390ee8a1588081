"""Retention / gated linear attention: parallel (chunked) == recurrent == a plain loop; the state is the whole cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.common import ArchConfig, TinyLM, build
from reference_impls.architectures.linear import Retention, cache_bytes, decay_scan, decay_step, make

from arch_checks import assert_step_equals_forward, loop_rope, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=3, n_heads=4, head_dim=8, d_ff=48)


def loop_recurrence(q, k, v, log_a):
    """S_t = diag(a_t) S_(t-1) + k_t^T v_t, o_t = q_t S_t, one head and one scalar at a time."""
    B, H, T, K = q.shape
    o = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, v.shape[-1])
            for t in range(T):
                a = log_a[min(b, log_a.shape[0] - 1), h, t].exp()  # (K,) or (1,)
                S = a[:, None] * S + torch.outer(k[b, h, t], v[b, h, t])
                o[b, h, t] = q[b, h, t] @ S
    return o


@pytest.mark.parametrize("per_channel", [False, True])
def test_parallel_equals_recurrent_equals_the_loop(per_channel):
    g = torch.Generator().manual_seed(0)
    B, H, T, K = 2, 3, 37, 4
    q, k, v = (torch.randn(B, H, T, K, generator=g) / 2 for _ in range(3))
    log_a = -torch.rand(B, H, T, K if per_channel else 1, generator=g) * 0.3
    ref = loop_recurrence(q, k, v, log_a)
    S = torch.zeros(B, H, K, K)
    steps = []
    for t in range(T):  # Eq. (6), one token at a time
        o, S = decay_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], log_a[:, :, t:t + 1], S)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 2), ref, atol=1e-5, rtol=1e-5)
    for chunk in (1, 5, 16, 64):  # 64 > T: the fully parallel form, Eq. (5)
        o, S_end = decay_scan(q, k, v, log_a, chunk=chunk)
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S_end, S, atol=1e-5, rtol=1e-5)


def test_the_parallel_form_is_eq5_with_the_decay_matrix():
    """(Q K^T ⊙ D) V with D_nm = γ^(n-m) for n >= m, 0 above the diagonal, built entry by entry."""
    g = torch.Generator().manual_seed(1)
    T, gamma = 9, 0.9
    q, k, v = (torch.randn(1, 1, T, 4, generator=g) for _ in range(3))
    D = torch.tensor([[gamma ** (n - m) if n >= m else 0.0 for m in range(T)] for n in range(T)])
    o, _ = decay_scan(q, k, v, torch.full((1, 1, T, 1), math.log(gamma)))
    torch.testing.assert_close(o[0, 0], (q[0, 0] @ k[0, 0].T * D) @ v[0, 0], atol=1e-5, rtol=1e-5)


def test_the_retention_layer_against_a_plain_reference():
    """Eq. (8): γ_h = 1 - 2^(-5-h), RoPE'd q and k, GroupNorm per head, swish gate, output projection."""
    torch.manual_seed(2)
    mixer, T = make(CFG)[0], 7
    H, D = CFG.n_heads, CFG.head_dim
    assert torch.allclose(mixer.log_gamma.exp(), torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)]))
    x = torch.randn(1, T, CFG.d_model)
    q, k, v, gate = (x[0] @ w.T for w in mixer.qkvg.weight.chunk(4, 0))  # (T, H * D) each
    pos, heads = torch.arange(T), []
    for h in range(H):
        s = slice(h * D, (h + 1) * D)
        qh, kh = loop_rope(q[:, s], pos, CFG.rope_base), loop_rope(k[:, s], pos, CFG.rope_base) / math.sqrt(D)
        gamma = 1 - 2.0 ** (-5 - h)
        out = torch.stack([sum(gamma ** (n - m) * (qh[n] @ kh[m]) * v[m, s] for m in range(n + 1)) for n in range(T)])
        heads.append(F.group_norm(out.reshape(T, 1, D), 1, eps=mixer.norm.eps))  # each head normalised alone
    y = torch.cat(heads, 1).reshape(T, H * D) * mixer.norm.weight + mixer.norm.bias
    ref = (F.silu(gate) * y) @ mixer.out.weight.T
    torch.testing.assert_close(mixer(x)[0].detach(), ref, atol=1e-5, rtol=1e-5)


def test_gla_gates_are_per_channel_and_match_the_loop():
    torch.manual_seed(3)
    mixer, x = Retention(CFG, gated=True), torch.randn(2, 11, CFG.d_model)
    alpha = torch.sigmoid(mixer.alpha(x)) ** (1 / 16)  # GLA: α_t = σ(x W_α1 W_α2 + b)^(1/τ), τ = 16
    B, T, H, D = 2, 11, CFG.n_heads, CFG.head_dim
    q, k, v, _ = mixer.qkvg(x).view(B, T, 4, H, D).permute(2, 0, 3, 1, 4)
    ref = loop_recurrence(q, k / math.sqrt(D), v, alpha.log().view(B, T, H, D).transpose(1, 2))
    o, _ = decay_scan(q, k / math.sqrt(D), v, alpha.log().view(B, T, H, D).transpose(1, 2), chunk=mixer.chunk)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_forward_equals_step_by_step(gated):
    torch.manual_seed(4)
    lm = TinyLM(CFG, make(CFG, gated=gated))
    assert_step_equals_forward(lm, T=70)  # longer than one chunk: the state crosses chunk borders
    assert_step_equals_forward(lm, T=70, chunks=[30, 1, 39])  # a multi-token step continues the state too


def test_measured_bytes_are_the_state_and_constant():
    torch.manual_seed(5)
    lm = build("linear", CFG)
    for T in (1, 8, 40):
        _, caches = step_by_step(lm, torch.zeros(2, T, dtype=torch.long))
        assert [tuple(c.held["state"].shape) for c in caches] == [(2, 4, 8, 8)] * 3
        assert lm.cache_nbytes(caches) == 2 * cache_bytes(CFG, T, 4) == 2 * 3 * 4 * 8 * 8 * 4
        assert caches[0].seen == T


def test_error_paths():
    with pytest.raises(ValueError, match="chunk"):
        Retention(CFG, chunk=-1)
    with pytest.raises(ValueError, match="tau"):
        Retention(CFG, gated=True, tau=0)
    with pytest.raises(ValueError, match="seq_len"):
        cache_bytes(CFG, -1)
