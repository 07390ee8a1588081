"""MLA (DeepSeek-V2, arXiv 2405.04434): absorbed == naive, parallel == incremental, the equations in a loop, bytes."""

import math

import pytest
import torch

from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, TinyLM
from reference_impls.architectures.mla import MLA, bytes_per_token, cache_bytes, make

from arch_checks import assert_step_equals_forward, loop_attention, loop_rope, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=48)


def pair(cfg=CFG, **kw):
    """Two TinyLMs with the same weights, one naive, one absorbed."""
    torch.manual_seed(0)
    naive = TinyLM(cfg, make(cfg, **kw))
    absorbed = TinyLM(cfg, make(cfg, absorbed=True, **kw))
    absorbed.load_state_dict(naive.state_dict())
    return naive, absorbed


@pytest.mark.parametrize("kw", [{}, {"d_latent": 12, "rope_dim": 2}])
def test_absorbed_equals_naive_in_parallel_and_step_by_step(kw):
    naive, absorbed = pair(**kw)
    ids = torch.randint(0, 32, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(absorbed(ids), naive(ids), atol=1e-5, rtol=0)
        a, _ = step_by_step(absorbed, ids)
        n, _ = step_by_step(naive, ids, chunks=[6, 1, 8])
    torch.testing.assert_close(a, n, atol=1e-5, rtol=0)
    assert_step_equals_forward(naive, T=15)
    assert_step_equals_forward(absorbed, T=15, chunks=[5, 10])


def test_naive_form_equals_the_equations_written_out():
    torch.manual_seed(2)
    m, x = MLA(CFG), torch.randn(1, 6, CFG.d_model)
    H, D, R, pos = 4, 8, 4, torch.arange(6)
    c = m.kv_norm(x[0] @ m.wdkv.weight.T)                                  # Eq. 9: the cached latent
    k_rope = loop_rope(x[0] @ m.wkr.weight.T, pos, CFG.rope_base)         # Eq. 15: one RoPE key for all heads
    kc, v = c @ m.wuk.weight.T, c @ m.wuv.weight.T                         # Eq. 10-11
    q, qr = x[0] @ m.wq.weight.T, x[0] @ m.wqr.weight.T
    heads = []
    for i in range(H):                                                     # Eq. 16-18 per head
        qi = torch.cat([q[:, i * D:(i + 1) * D], loop_rope(qr[:, i * R:(i + 1) * R], pos, CFG.rope_base)], -1)
        ki = torch.cat([kc[:, i * D:(i + 1) * D], k_rope], -1)
        heads.append(loop_attention(qi, ki, v[:, i * D:(i + 1) * D], pos, pos, scale=1 / math.sqrt(D + R)))
    ref = torch.cat(heads, -1) @ m.wo.weight.T                             # Eq. 19
    torch.testing.assert_close(m(x)[0].detach(), ref, atol=1e-5, rtol=0)


def test_the_cache_holds_only_the_latent_and_the_rope_key():
    naive, _ = pair()
    _, caches = step_by_step(naive, torch.zeros(1, 9, dtype=torch.long))
    assert {k: tuple(v.shape) for k, v in caches[0].held.items()} == {"c": (1, 1, 9, 32), "kr": (1, 1, 9, 4)}


@pytest.mark.parametrize("n_heads", [4, 8])
def test_measured_bytes_equal_the_closed_form_whatever_the_heads(n_heads):
    cfg = ArchConfig(vocab=32, d_model=32, n_layers=2, n_heads=n_heads, head_dim=8, d_ff=48)
    naive, _ = pair(cfg)
    for T in (1, 7, 20):
        _, caches = step_by_step(naive, torch.zeros(1, T, dtype=torch.long))
        assert naive.cache_nbytes(caches) == cache_bytes(cfg, T, 4) == T * 2 * (32 + 4) * 4


def test_deepseek_v2_shape_is_its_table_1_cache():
    cfg = ArchConfig(d_model=5120, n_layers=60, n_heads=128, head_dim=128, n_kv_heads=128)
    assert bytes_per_token(cfg, 1) == (512 + 64) * 60  # d_c = 4 d_h, d_h^R = d_h / 2: 9/2 d_h per layer
    assert bytes_per_token(cfg, 1) / mha.bytes_per_token(cfg, 1) == pytest.approx(576 / (2 * 128 * 128))


def test_errors():
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MLA(CFG, rope_dim=3)
    with pytest.raises(ValueError, match="d_latent must be >= 1"):
        MLA(CFG, d_latent=-4)
