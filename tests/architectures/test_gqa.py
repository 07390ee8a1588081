"""GQA (arXiv 2305.13245): groups of query heads share a KV head; equal to MHA with each group's KV head copied."""

import pytest
import torch

from reference_impls.architectures import mha
from reference_impls.architectures.common import ArchConfig, build
from reference_impls.architectures.gqa import bytes_per_token, cache_bytes, kv_heads
from reference_impls.architectures.mha import Attention

from arch_checks import assert_step_equals_forward, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=2, n_heads=8, head_dim=8, n_kv_heads=2, d_ff=48)


def test_step_equals_forward():
    torch.manual_seed(0)
    lm = build("gqa", CFG)
    assert [m.n_kv_heads for m in lm.mixers] == [2, 2]
    assert_step_equals_forward(lm, T=13)
    assert_step_equals_forward(lm, T=13, chunks=[4, 9])


def test_gqa_equals_mha_whose_kv_heads_repeat_within_each_group():
    torch.manual_seed(1)
    g, D, G = Attention(CFG), CFG.head_dim, 4  # 8 query heads, 2 KV heads: groups of G = 4 consecutive heads
    full = Attention(CFG, n_kv_heads=8)
    with torch.no_grad():
        full.wq.weight.copy_(g.wq.weight)
        full.wo.weight.copy_(g.wo.weight)
        for h in range(8):  # query head h belongs to group h // G
            rows = slice((h // G) * D, (h // G + 1) * D)
            full.wk.weight[h * D:(h + 1) * D] = g.wk.weight[rows]
            full.wv.weight[h * D:(h + 1) * D] = g.wv.weight[rows]
        x = torch.randn(2, 7, CFG.d_model)
        torch.testing.assert_close(g(x), full(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv,expected", [(2, 2), (4, 4), (8, 4), (1, 4)])
def test_kv_heads_take_a_real_grouping_or_groups_of_two(n_kv, expected):
    assert kv_heads(ArchConfig(n_heads=8, n_kv_heads=n_kv)) == expected


def test_measured_bytes_equal_the_closed_form():
    torch.manual_seed(0)
    lm = build("gqa", CFG)
    for T in (1, 5, 12):
        _, caches = step_by_step(lm, torch.zeros(1, T, dtype=torch.long))
        assert lm.cache_nbytes(caches) == cache_bytes(CFG, T, 4) == T * 2 * 2 * 2 * 8 * 4
    assert bytes_per_token(CFG) * 4 == mha.bytes_per_token(CFG)  # G = 4


@pytest.mark.parametrize("n_heads", [2, 3])
def test_no_grouping_possible(n_heads):
    with pytest.raises(ValueError, match="GQA needs 1 < n_kv_heads < n_heads"):
        kv_heads(ArchConfig(n_heads=n_heads, n_kv_heads=n_heads))
