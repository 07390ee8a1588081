"""MQA (arXiv 1911.02150): one KV head per layer; parallel == incremental; every query head reads it; bytes."""

import torch

from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, build
from reference_impls.architectures.mqa import bytes_per_token, cache_bytes, make

from arch_checks import assert_step_equals_forward, loop_attention, loop_rope, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=3, n_heads=4, head_dim=8, n_kv_heads=4, d_ff=48)


def test_step_equals_forward():
    torch.manual_seed(0)
    lm = build("mqa", CFG)
    assert all(m.n_kv_heads == 1 and m.wk.out_features == CFG.head_dim for m in lm.mixers)
    assert_step_equals_forward(lm, T=13)
    assert_step_equals_forward(lm, T=13, chunks=[5, 1, 7])


def test_every_query_head_reads_the_one_key_and_value_head():
    torch.manual_seed(1)
    mixer, x, pos, D = make(CFG)[0], torch.randn(1, 5, CFG.d_model), torch.arange(5), CFG.head_dim
    k = loop_rope(x[0] @ mixer.wk.weight.T, pos, CFG.rope_base)  # (T, D): the only key head
    v = x[0] @ mixer.wv.weight.T
    q = x[0] @ mixer.wq.weight.T
    heads = [loop_attention(loop_rope(q[:, h * D:(h + 1) * D], pos, CFG.rope_base), k, v, pos, pos) for h in range(4)]
    torch.testing.assert_close(mixer(x)[0].detach(), torch.cat(heads, -1) @ mixer.wo.weight.T, atol=1e-5, rtol=0)


def test_measured_bytes_equal_the_closed_form_and_are_mha_over_heads():
    torch.manual_seed(0)
    lm = build("mqa", CFG)
    for T in (1, 6, 17):
        _, caches = step_by_step(lm, torch.zeros(1, T, dtype=torch.long))
        assert lm.cache_nbytes(caches) == cache_bytes(CFG, T, 4) == T * 3 * 2 * 8 * 4
    assert bytes_per_token(CFG) * CFG.n_heads == mha.bytes_per_token(CFG)
