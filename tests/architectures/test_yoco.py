"""YOCO (arXiv 2405.05254): sliding-window self-decoder, one global KV cache for the cross-decoder; bytes."""

import pytest
import torch

from reference_impls.architectures.common import ArchConfig, build
from reference_impls.architectures.yoco import bytes_per_token, cache_bytes, make, self_decoder_bytes

from arch_checks import assert_step_equals_forward, step_by_step

CFG = ArchConfig(vocab=32, d_model=32, n_layers=6, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=48, window=4)


def lm_of(cfg=CFG):
    torch.manual_seed(0)
    return build("yoco", cfg)


def test_layout_self_decoder_then_one_producer_then_readers():
    kinds = [(type(m).__name__, getattr(m, "window", None), m.exports) for m in lm_of().mixers]
    assert kinds == ([("Attention", 4, False)] * 3 + [("Attention", None, True)]
                     + [("SharedKVAttention", None, False)] * 2)


@pytest.mark.parametrize("n_layers", [2, 3, 6])
def test_step_equals_forward(n_layers):
    cfg = ArchConfig(vocab=32, d_model=32, n_layers=n_layers, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=48, window=4)
    assert_step_equals_forward(lm_of(cfg), T=14)
    assert_step_equals_forward(lm_of(cfg), T=14, chunks=[6, 1, 7])


def test_bytes_match_the_closed_form_and_only_the_global_cache_grows():
    lm, per_layer = lm_of(), 2 * 2 * 8 * 4  # (k, v) * H_kv * D * fp32
    for T in (1, 3, 4, 10, 25):
        _, caches = step_by_step(lm, torch.zeros(1, T, dtype=torch.long))
        assert [c.nbytes() for c in caches] == [min(T, 4) * per_layer] * 3 + [T * per_layer, 0, 0]
        assert lm.cache_nbytes(caches) == cache_bytes(CFG, T, 4) == self_decoder_bytes(CFG, T, 4) + T * per_layer
    assert bytes_per_token(CFG, 4) == per_layer


def self_decoder(lm, ids):
    """The hidden states after the lower half (3 blocks), run by hand."""
    h = lm.embed(ids)
    for i in range(3):
        h = h + lm.mixers[i](lm.norms1[i](h))
        h = h + lm.mlps[i](lm.norms2[i](h))
    return h


def test_the_cross_decoder_sees_beyond_the_self_decoders_reach():
    # 3 window-4 layers carry a token at most 9 positions forward; the global cache carries it anywhere
    lm, ids = lm_of(), torch.randint(0, 32, (1, 30), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 32
    with torch.no_grad():
        assert not torch.allclose(lm(ids)[0, -1], lm(other)[0, -1])
        torch.testing.assert_close(self_decoder(lm, ids)[0, -1], self_decoder(lm, other)[0, -1])


def test_errors():
    with pytest.raises(ValueError, match="n_layers must be >= 2"):
        make(ArchConfig(n_layers=1))
