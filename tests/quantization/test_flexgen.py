"""FlexGen-style group quantization (arXiv 2303.06865): per-token groups, no window; plain-loop reference."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.quantization.flexgen import FlexGen
from reference_impls.quantization.ratios import FP32

from quant_checks import MODEL, after


def per_token_ref(x, bits, G):
    """FlexGen's formula written out: per token, groups of G channels, x_hat = mn + round((x-mn)/s) * s."""
    x = x.float()
    out = torch.empty_like(x)
    qmax = 2 ** bits - 1
    for s in range(0, x.shape[-1], G):
        blk = x[..., s:s + G]
        mn = blk.amin(-1, keepdim=True).to(torch.float16).float()
        sc = ((blk.amax(-1, keepdim=True) - blk.amin(-1, keepdim=True)) / qmax).to(torch.float16).float()
        q = torch.where(sc > 0, (blk - mn) / torch.where(sc > 0, sc, 1), 0).round().clamp(0, qmax)
        out[..., s:s + G] = mn + q * sc
    return out


@pytest.mark.parametrize("bits,G,D", [(4, 32, 64), (2, 8, 20), (8, 64, 16)])
def test_store_equals_the_reference_at_every_step(bits, G, D):
    gen = torch.Generator().manual_seed(bits)
    k_all = torch.randn(2, 3, 30, D, generator=gen).half()
    v_all = torch.randn(2, 3, 30, D, generator=gen).half()
    store = FlexGen(bits=bits, group_size=G).new_layer(0, MODEL)
    t = 0
    for q in (17, 1, 1, 4, 1, 6):
        keys, values, slots = store.append(k_all[:, :, t:t + q], v_all[:, :, t:t + q])
        assert slots is None
        assert torch.equal(keys[:, :, t:], k_all[:, :, t:t + q])  # this step's tokens are exact
        if t:
            assert torch.allclose(keys[:, :, :t].float(), per_token_ref(k_all[:, :, :t], bits, G), atol=1e-3)
            assert torch.allclose(values[:, :, :t].float(), per_token_ref(v_all[:, :, :t], bits, G), atol=1e-3)
        after(store, keys, values, q, compress=t == 0)
        t += q
    n_groups = -(-D // G)
    codes = 2 * 3 * t * (-(-D * bits // 8))
    assert store.nbytes() == 2 * (codes + 2 * (2 * 3 * t * n_groups * 2))  # K and V: codes + fp16 scale, zero


@torch.no_grad()
def test_prefill_is_exact_decoding_is_close_and_replay_is_exact(tiny):
    x = torch.randint(3, 128, (1, 33), generator=torch.Generator().manual_seed(2))
    full, q4 = KVCache(tiny, Full()), KVCache(tiny, FlexGen(bits=4, group_size=8))
    assert torch.equal(tiny(x, cache=full).logits, tiny(x, cache=q4).logits)
    replay = cache_from_record(tiny, FlexGen(bits=4, group_size=8), record_prefill(tiny, x))
    assert replay.nbytes() == q4.nbytes() == full.nbytes() * (4 + 2 * 32 / 8) // 32  # fp32 scale+zero per 8
    for t in (5, 6):
        nxt = torch.tensor([[t]])
        a, b, c = tiny(nxt, cache=full).logits, tiny(nxt, cache=q4).logits, tiny(nxt, cache=replay).logits
        assert torch.equal(b, c) and torch.allclose(a, b, atol=0.2)


def test_from_ratio_and_bad_parameters():
    # 16-bit cache: 16 / (b + 32 / G); fp32 cache: 32 / (b + 64 / G), the nearest on a log scale
    assert [(m.bits, m.group_size) for m in map(FlexGen.from_ratio, (1, 2, 3.2, 4, 8))] == [
        (8, 16), (8, 64), (4, 32), (2, 16), (1, 32)]
    assert [(m.bits, m.group_size) for m in (FlexGen.from_ratio(r, FP32) for r in (1, 2, 3.2, 4, 8, 12))] == [
        (8, 16), (8, 16), (8, 32), (4, 16), (2, 32), (2, 64)]  # 12: 2 bits G = 64 ties 1 bit G = 32 (10.7x)
    with pytest.raises(ValueError, match="ratio"):
        FlexGen.from_ratio(0)
    with pytest.raises(ValueError, match="bits"):
        FlexGen(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        FlexGen(group_size=-1)
