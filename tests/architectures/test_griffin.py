"""Griffin: RG-LRU (Eq. 1-4) against a plain loop; parallel == step by step; bytes stop growing past the window."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, build
from reference_impls.architectures.griffin import MAX_SQRT_GRAD, RecurrentBlock, cache_bytes, make, sqrt_bounded_grad
from reference_impls.architectures.mha import Attention

from arch_checks import assert_step_equals_forward, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=6, n_heads=4, head_dim=8, d_ff=48, window=8)


def test_two_recurrent_blocks_then_one_local_mqa_block():
    mixers = make(CFG)
    assert [isinstance(m, Attention) for m in mixers] == [False, False, True] * 2
    assert all(m.n_kv_heads == 1 and m.window == CFG.window for m in mixers if isinstance(m, Attention))


def test_initial_decay_and_the_rg_lru_against_a_plain_loop():
    torch.manual_seed(0)
    m, T = RecurrentBlock(CFG), 10
    a = torch.sigmoid(m.lam)
    assert ((a ** 8 >= 0.9 - 1e-6) & (a ** 8 <= 0.999 + 1e-6)).all()  # a^c uniform in [0.9, 0.999], c = 8
    x = torch.randn(1, T, CFG.d_model)
    xr, w = x[0] @ m.rnn_branch.weight.T + m.rnn_branch.bias, m.conv.weight[:, 0]
    h, ys = torch.zeros(m.d_rnn), []
    for t in range(T):
        u = sum(w[:, j] * xr[t - 3 + j] for j in range(4) if t - 3 + j >= 0) + m.conv.bias  # causal Conv1D
        r = torch.sigmoid(m.w_a.weight @ u + m.w_a.bias)  # Eq. (1) recurrence gate
        i = torch.sigmoid(m.w_x.weight @ u + m.w_x.bias)  # Eq. (2) input gate
        a_t = a ** (8 * r)  # Eq. (3)
        h = a_t * h + torch.sqrt(1 - a_t ** 2) * (i * u)  # Eq. (4)
        ys.append(F.gelu(m.gate_branch.weight @ x[0, t] + m.gate_branch.bias) * h)
    ref = torch.stack(ys) @ m.out.weight.T + m.out.bias
    torch.testing.assert_close(m(x)[0].detach(), ref, atol=1e-5, rtol=1e-5)


def test_parallel_equals_recurrent_in_the_block_and_the_model():
    torch.manual_seed(1)
    m, x = RecurrentBlock(CFG), torch.randn(2, 29, CFG.d_model)
    cache = m.new_cache(2)
    with torch.no_grad():
        steps = torch.cat([m(x[:, t:t + 1], cache) for t in range(29)], 1)
        torch.testing.assert_close(steps, m(x), atol=1e-5, rtol=1e-5)
    lm = build("griffin", CFG)
    assert_step_equals_forward(lm, T=29)  # > 3 windows: the attention layers drop what slid out
    assert_step_equals_forward(lm, T=29, chunks=[3, 1, 12, 13])


def test_measured_bytes_equal_the_closed_form_and_stop_growing_past_the_window():
    torch.manual_seed(2)
    lm = build("griffin", CFG)
    measured = {}
    for T in (1, 5, 8, 9, 30):
        _, caches = step_by_step(lm, torch.zeros(1, T, dtype=torch.long))
        measured[T] = lm.cache_nbytes(caches)
        recurrent, attention = 4 * (32 + 32 * 3), 2 * 2 * 8 * min(T, 8)  # h + conv state; k, v of one KV head
        assert measured[T] == cache_bytes(CFG, T, 4) == (recurrent + attention) * 4
    assert measured[8] == measured[9] == measured[30] > measured[5]
    assert cache_bytes(CFG, 10_000) < mha.cache_bytes(CFG, CFG.window)  # far below full MHA at the window already
    assert math.isclose(cache_bytes(CFG, 10**6) / cache_bytes(CFG, 10**3), 1.0)


def test_error_paths():
    with pytest.raises(ValueError, match="d_conv"):
        RecurrentBlock(CFG, d_conv=0)
    with pytest.raises(ValueError, match="c > 0"):
        RecurrentBlock(CFG, c=0)
    with pytest.raises(ValueError, match="seq_len"):
        cache_bytes(CFG, -1)


def test_a_saturated_recurrence_gate_gives_finite_gradients():
    # r_t = σ(-200) = 0 in fp32, so a_t = 1 and 1 - a_t² = 0: the plain sqrt's derivative there is infinite and,
    # times sigmoid's zero slope, NaN (what broke training at lr 1e-2); the official code caps it, as we do
    torch.manual_seed(0)
    m = RecurrentBlock(CFG)
    with torch.no_grad():
        m.w_a.bias.fill_(-200.0)
    x = torch.randn(2, 6, CFG.d_model)
    m(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    u = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    sqrt_bounded_grad(u).sum().backward()
    assert torch.allclose(sqrt_bounded_grad(u), u.sqrt())
    assert u.grad.tolist() == pytest.approx([MAX_SQRT_GRAD, MAX_SQRT_GRAD, 1.0])
