"""ZipCache (arXiv 2405.14256): normalized attention picks the salient tokens; mixed-precision storage."""

import math

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.base import Model, Step
from reference_impls.quantization.zipcache import ZipCache, normalized_attention
from reference_impls.quantization.ratios import FP32

from quant_checks import ids


def minmax_ref(x, bits, dim):
    """Independent asymmetric min-max round trip over the whole `dim` (one range per vector)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    s = (hi - lo) / (2 ** bits - 1)
    return lo + ((x - lo) / torch.where(s > 0, s, 1)).round().clamp(0, 2 ** bits - 1) * s


def test_normalized_attention_divides_column_sums_by_the_queries_that_see_each_token():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T = 1, 4, 2, 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(torch.randn(B, H, T, T, generator=g).masked_fill(~causal, float("-inf")), -1)
    got = normalized_attention(probs, causal.sum(0).expand(B, Hkv, T), groups=2)
    for h in range(Hkv):
        for i in range(T):  # by hand: token i is seen by queries i .. T-1
            col = sum(float(probs[0, hq, j, i]) for hq in (2 * h, 2 * h + 1) for j in range(i, T))
            assert math.isclose(float(got[0, h, i]), col / (T - i), rel_tol=1e-5)


@torch.no_grad()
def test_salient_tokens_are_the_top_normalized_scores_and_each_set_is_quantized_on_its_own():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, D = 2, 4, 2, 30, 8
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), \
        torch.randn(B, Hkv, T, D, generator=g)
    store = ZipCache(salient_ratio=0.3, high_bits=8, low_bits=2).new_layer(0, Model())
    store.append(k, v)
    store.after_attention(Step.dense(q, k, v))
    keys, values, _ = store.append(torch.zeros(B, Hkv, 1, D), torch.zeros(B, Hkv, 1, D))
    # reference: softmax attention, column sums over queries and the 2 query heads, / (T - i), top 9 per head
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * D ** -0.5).masked_fill(~causal, -1e9), -1)
    score = p.reshape(B, Hkv, 2, T, T).sum((2, 3)) / torch.arange(T, 0, -1)
    for b in range(B):
        for h in range(Hkv):
            sal = score[b, h].topk(9).indices.sort().values
            reg = torch.tensor(sorted(set(range(T)) - set(sal.tolist())))
            for idx, bits in ((sal, 8), (reg, 2)):
                assert torch.allclose(keys[b, h, idx], minmax_ref(k[b, h, idx], bits, 0), atol=1e-5)  # per channel
                c = v[b, h].abs().amax(0).sqrt()  # channel-separable: divide channels, then one range per token
                assert torch.allclose(values[b, h, idx], minmax_ref(v[b, h, idx] / c, bits, 1) * c, atol=1e-5)


@torch.no_grad()
def test_prefill_exact_streaming_blocks_and_bytes(tiny):
    x = ids(40, seed=2)
    full = KVCache(tiny, Full())
    ref = tiny(x, cache=full).logits
    cache = KVCache(tiny, ZipCache(salient_ratio=0.5, streaming_gap=4))
    assert torch.equal(tiny(x, cache=cache).logits, ref)
    for t in range(9):
        a, b = tiny(torch.tensor([[t + 5]]), cache=full).logits, tiny(torch.tensor([[t + 5]]), cache=cache).logits
        assert torch.allclose(a, b, atol=0.5)
    store = cache.layers[0].store  # 49 tokens: the prompt, two blocks of 4 decoded tokens, 1 in the buffer
    assert [b["n"] for b in store.blocks] == [40, 4, 4] and store.k.shape[2] == 1
    B, H, D = 1, 2, 16
    expect = 2 * B * H * D * 4  # buffer
    for n in (40, 4, 4):
        hi, lo = round(0.5 * n), n - round(0.5 * n)
        expect += B * H * math.ceil(n / 8)  # 1-bit salient mask
        expect += B * H * D * 4  # value channel scales
        expect += B * H * D * (hi * 4 + lo * 2) // 8 * 2  # key and value codes, 4 and 2 bits
        expect += 2 * 4 * B * H * D * 2  # key ranges: per channel, per set (scale + zero, fp32)
        expect += 2 * 4 * B * H * n  # value ranges: per token
    assert store.nbytes() == expect and cache.nbytes() < 0.5 * full.nbytes()


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="salient_ratio"):
        ZipCache(salient_ratio=1.5)
    with pytest.raises(ValueError, match="high_bits"):
        ZipCache(high_bits=3)
    with pytest.raises(ValueError, match="high_bits"):
        ZipCache(high_bits=2, low_bits=4)
    with pytest.raises(ValueError, match="streaming_gap"):
        ZipCache(streaming_gap=0)
    with pytest.raises(ValueError, match="ratio"):
        ZipCache.from_ratio(-1)
    for r in (4, 4.5, 8, 15):  # within a pair's span the salient ratio hits the target up to the rounding of s T
        assert ZipCache.from_ratio(r, FP32).nominal_ratio(FP32) == pytest.approx(r, rel=5e-3)
    for r in (2, 3, 4, 8, 12):  # the same on the benchmark's 16-bit cache (its spans: 1.9x .. 12.6x)
        assert ZipCache.from_ratio(r).nominal_ratio() == pytest.approx(r, rel=5e-3)
    m = ZipCache.from_ratio(2, FP32)  # below every span of an fp32 cache: all tokens at 8 bits
    assert (m.high_bits, m.salient_ratio) == (8, 1.0)
