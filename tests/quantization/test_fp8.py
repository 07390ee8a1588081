"""FP8 KV cache (E4M3 / E5M2, arXiv 2209.05433; vLLM/transformers usage): real 1-byte storage, frozen scales."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.quantization.fp8 import FP8
from reference_impls.quantization.ratios import FP32

from quant_checks import MODEL, after


@pytest.mark.parametrize("fmt,top,rel", [("e4m3", 448.0, 2 ** -4), ("e5m2", 57344.0, 2 ** -3)])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_storage_scales_and_round_trip(fmt, top, rel, granularity):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 40, 16, generator=gen) * torch.tensor([1.0, 10.0, 0.1])[None, :, None, None]
    v = torch.randn(2, 3, 40, 16, generator=gen)
    store = FP8(fmt=fmt, granularity=granularity).new_layer(0, MODEL)
    after(store, *store.append(k, v)[:2], k.shape[2])
    dims = (0, 2, 3) if granularity == "head" else (0, 1, 2, 3)
    scale = k.abs().amax(dim=dims, keepdim=True) / top  # the reference: amax over the calibration tokens / max
    assert store.blocks[0]["k"].dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    assert torch.allclose(store.state["k_scale"], scale) and store.state["k_scale"].shape == ((1, 3, 1, 1) if dims[1] == 2 else (1,) * 4)
    assert store.nbytes() == 2 * k.numel() + 2 * scale.numel() * 4  # 1 byte per element + fp32 scales
    nxt = torch.randn(2, 3, 1, 16, generator=gen)
    keys, _, _ = store.append(nxt, nxt)
    # relative error of a normal FP8 number: half a unit in the last place of its mantissa
    normal = k.abs() > scale * torch.finfo(store.blocks[0]["k"].dtype).smallest_normal
    err = (keys[:, :, :40] - k).abs()
    assert bool((err[normal] <= rel * k.abs()[normal] + 1e-7).all())
    assert torch.equal(keys[:, :, 40:], nxt)


def test_scale_is_frozen_and_outliers_saturate():
    store = FP8().new_layer(0, MODEL)
    after(store, *store.append(torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8))[:2], 4)
    big = torch.full((1, 1, 1, 8), 5.0)
    after(store, *store.append(big, -big)[:2], 1, compress=False)
    keys, values, _ = store.append(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    assert torch.allclose(store.state["k_scale"], torch.tensor(1 / 448))
    assert torch.equal(keys[0, 0, 4], torch.ones(8)) and torch.equal(values[0, 0, 4], -torch.ones(8))  # clipped at amax


@torch.no_grad()
def test_prefill_exact_and_replay_exact(tiny):
    x = torch.randint(3, 128, (1, 29), generator=torch.Generator().manual_seed(3))
    full, f8 = KVCache(tiny, Full()), KVCache(tiny, FP8())
    assert torch.equal(tiny(x, cache=full).logits, tiny(x, cache=f8).logits)
    replay = cache_from_record(tiny, FP8(), record_prefill(tiny, x))
    for t in (4, 5):
        nxt = torch.tensor([[t]])
        a, b, c = tiny(nxt, cache=full).logits, tiny(nxt, cache=f8).logits, tiny(nxt, cache=replay).logits
        assert torch.equal(b, c) and torch.allclose(a, b, atol=0.05)
    assert f8.nbytes() < full.nbytes() / 3.9  # fp32 tiny model: 4 bytes -> 1 byte


def test_from_ratio_and_bad_parameters():
    assert FP8.from_ratio(2) == FP8.from_ratio(8) == FP8() and FP8().nominal_ratio() == 2  # 16-bit cache
    assert FP8().nominal_ratio(FP32) == 4
    with pytest.raises(ValueError, match="ratio"):
        FP8.from_ratio(0.9)
    with pytest.raises(ValueError, match="fmt"):
        FP8(fmt="e3m4")
    with pytest.raises(ValueError, match="granularity"):
        FP8(granularity="channel")
