"""CLA (arXiv 2405.12981): reusing layers hold nothing and read the producer's keys; parallel == incremental; bytes."""

import math

import pytest
import torch

from reference_impls.architectures import mha
from reference_impls.architectures.cla import SharedKVAttention, bytes_per_token, cache_bytes, make
from reference_impls.architectures.common import ArchConfig, TinyLM
from reference_impls.architectures.mha import Attention

from arch_checks import assert_step_equals_forward, loop_attention, loop_rope, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=5, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=48)


def lm_of(share):
    torch.manual_seed(0)
    return TinyLM(CFG, make(CFG, share))


@pytest.mark.parametrize("share", [1, 2, 3, 5])
def test_step_equals_forward(share):
    assert_step_equals_forward(lm_of(share), T=13)
    assert_step_equals_forward(lm_of(share), T=13, chunks=[3, 1, 9])


@pytest.mark.parametrize("share", [1, 2, 3])
def test_reusing_layers_hold_nothing_and_bytes_match_the_closed_form(share):
    lm = lm_of(share)
    for T in (1, 8, 21):
        _, caches = step_by_step(lm, torch.zeros(1, T, dtype=torch.long))
        assert [c.nbytes() > 0 for c in caches] == [i % share == 0 for i in range(5)]
        assert lm.cache_nbytes(caches) == cache_bytes(CFG, T, 4, share) == T * math.ceil(5 / share) * 2 * 2 * 8 * 4
    assert bytes_per_token(CFG, 2, share=1) == mha.bytes_per_token(CFG, 2, n_kv_heads=2)


def test_a_reusing_layer_attends_to_the_producers_keys_and_values():
    torch.manual_seed(1)
    producer, reader = Attention(CFG, export=True), SharedKVAttention(CFG)
    x1, x2, pos, D = torch.randn(1, 6, CFG.d_model), torch.randn(1, 6, CFG.d_model), torch.arange(6), CFG.head_dim
    _, kv = producer(x1)
    k, v = x1[0] @ producer.wk.weight.T, x1[0] @ producer.wv.weight.T  # written out: what layer 1 reuses
    q = x2[0] @ reader.wq.weight.T
    heads = []
    for h in range(4):
        g = h // 2
        kh = loop_rope(k[:, g * D:(g + 1) * D], pos, CFG.rope_base)
        qh = loop_rope(q[:, h * D:(h + 1) * D], pos, CFG.rope_base)
        heads.append(loop_attention(qh, kh, v[:, g * D:(g + 1) * D], pos, pos))
    torch.testing.assert_close(reader(x2, shared=kv)[0].detach(), torch.cat(heads, -1) @ reader.wo.weight.T,
                               atol=1e-5, rtol=0)
    assert not any("wk" in n or "wv" in n for n, _ in reader.named_parameters())


def test_errors():
    with pytest.raises(ValueError, match="share must be in"):
        make(CFG, share=0)
    with pytest.raises(ValueError, match="share must be in"):
        make(CFG, share=6)
    with pytest.raises(ValueError, match="shared must be the"):
        SharedKVAttention(CFG)(torch.zeros(1, 2, CFG.d_model))
