"""Mamba: the parallel scan == the step-by-step recurrence == a plain loop of Algorithm 2; constant cache bytes."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.common import ArchConfig, TinyLM, build
from reference_impls.architectures.mamba import Mamba, cache_bytes, causal_conv, linear_scan, make

from arch_checks import assert_step_equals_forward, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=3, n_heads=4, head_dim=8, d_ff=48)


def loop_scan(a, b, h):
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
def test_parallel_scan_equals_the_loop(T):
    g = torch.Generator().manual_seed(T)
    a, b = torch.rand(2, T, 3, 5, generator=g), torch.randn(2, T, 3, 5, generator=g)
    h0 = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(linear_scan(a, b), loop_scan(a, b, torch.zeros(2, 3, 5)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_scan(a, b, h0), loop_scan(a, b, h0), atol=1e-5, rtol=1e-5)


def test_the_scan_survives_decays_that_overflow_log_space_cumsums():
    """h_t = exp(L_t) Σ_s exp(-L_s) b_s with L the running sum of log a: exp(-L) overflows, the scan does not."""
    T = 40
    a, b = torch.full((1, T, 1), torch.exp(torch.tensor(-5.0)).item()), torch.ones(1, T, 1)
    L = a.log().cumsum(1)
    assert torch.isinf(torch.exp(-L)).any()  # -L reaches 200 > 88
    h = linear_scan(a, b)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, loop_scan(a, b, torch.zeros(1, 1)), atol=1e-6, rtol=1e-6)


def test_causal_conv_continues_from_its_state():
    torch.manual_seed(0)
    conv, x = torch.nn.Conv1d(6, 6, 4, groups=6), torch.randn(2, 11, 6)
    full, state = causal_conv(x, conv, torch.zeros(2, 6, 3))
    y1, s1 = causal_conv(x[:, :2], conv, torch.zeros(2, 6, 3))  # fewer new tokens than the conv's memory
    y2, s2 = causal_conv(x[:, 2:], conv, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    torch.testing.assert_close(s2, state)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))  # the state is the last k-1 inputs


def test_the_block_against_a_plain_loop_of_algorithm_2():
    torch.manual_seed(1)
    m, T = Mamba(CFG, d_state=4), 9
    x = torch.randn(1, T, CFG.d_model)
    xs, z = (x[0] @ m.in_proj.weight.T).chunk(2, -1)
    w, A, N = m.conv.weight[:, 0], -m.A_log.exp(), 4  # w (d_in, k)
    h, ys = torch.zeros(m.d_in, N), []
    for t in range(T):
        u = sum(w[:, j] * xs[t - 3 + j] for j in range(4) if t - 3 + j >= 0) + m.conv.bias  # causal depthwise conv
        u = F.silu(u)
        dt_in, Bt, Ct = (m.x_proj.weight @ u).split([m.dt_rank, N, N])
        dt = F.softplus(m.dt_proj.weight @ dt_in + m.dt_proj.bias)  # Δ_t (d_in,)
        h = torch.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None]  # Ā = exp(ΔA), B̄ ≈ ΔB
        ys.append((h @ Ct + m.D * u) * F.silu(z[t]))
    ref = torch.stack(ys) @ m.out_proj.weight.T
    torch.testing.assert_close(m(x)[0].detach(), ref, atol=1e-5, rtol=1e-5)


def test_parallel_equals_recurrent_in_the_layer_and_the_model():
    torch.manual_seed(2)
    m, x = Mamba(CFG), torch.randn(2, 33, CFG.d_model)
    cache = m.new_cache(2)
    with torch.no_grad():
        steps = torch.cat([m(x[:, t:t + 1], cache) for t in range(33)], 1)
        torch.testing.assert_close(steps, m(x), atol=1e-5, rtol=1e-5)
    lm = build("mamba", CFG)
    assert_step_equals_forward(lm, T=33)
    assert_step_equals_forward(lm, T=33, chunks=[2, 1, 20, 10])  # a 2-token step: shorter than the conv state


def test_measured_bytes_are_constant_and_the_closed_form():
    torch.manual_seed(3)
    lm = build("mamba", CFG)
    d_in = 2 * CFG.d_model
    for T in (1, 5, 40):
        _, caches = step_by_step(lm, torch.zeros(2, T, dtype=torch.long))
        assert tuple(caches[0].held["ssm"].shape) == (2, d_in, 16)
        assert tuple(caches[0].held["conv"].shape) == (2, d_in, 3)
        assert lm.cache_nbytes(caches) == 2 * cache_bytes(CFG, T, 4) == 2 * 3 * d_in * (16 + 3) * 4
    small = TinyLM(CFG, make(CFG, d_state=4, expand=1, d_conv=2))
    _, caches = step_by_step(small, torch.zeros(1, 3, dtype=torch.long))
    assert small.cache_nbytes(caches) == cache_bytes(CFG, 3, 4, d_state=4, expand=1, d_conv=2)


def test_error_paths():
    with pytest.raises(ValueError, match="d_state"):
        Mamba(CFG, d_state=0)
    with pytest.raises(ValueError, match="d_conv"):
        Mamba(CFG, d_conv=0)
    with pytest.raises(ValueError, match="seq_len"):
        cache_bytes(CFG, -1)
