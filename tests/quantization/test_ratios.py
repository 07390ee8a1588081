"""from_ratio: each method's nominal ratio is the bytes its store really holds, and targets map to the nearest."""

import pytest
import torch

from reference_impls.base import Model, Step
from reference_impls.quantization import FP8, GEAR, KIVI, QJL, FlexGen, KVQuant, ZipCache
from reference_impls.quantization.ratios import EMBEDDED, FP32, CacheSpec, closest

CANDIDATES = {  # every configuration from_ratio can return (ZipCache: a few salient ratios)
    "kivi": [KIVI(bits=b) for b in (8, 4, 2, 1)] + [KIVI(bits=4, residual_length=0)],
    "flexgen": [FlexGen(bits=b, group_size=g) for b in (8, 4, 2, 1) for g in (16, 32, 64)],
    "fp8": [FP8()],
    "kvquant": [KVQuant(bits=b) for b in (8, 6, 3, 2, 1)],
    "gear": [GEAR(bits=b) for b in (8, 4, 2, 1)],
    "zipcache": [ZipCache(salient_ratio=s, high_bits=h, low_bits=h // 2) for h in (8, 4, 2) for s in (0, 0.37, 1)],
    "qjl": [QJL(sketch_dim=64 * b, outlier_sketch_dim=64 * b, value_bits=b) for b in (8, 4, 2, 1)],
}


def measured_ratio(method, T, D, dtype, H=3):
    """Full bytes / bytes one layer's store holds after a compressing pass over T random tokens."""
    g = torch.Generator().manual_seed(T)
    k, v = (torch.randn(1, H, T, D, generator=g) * 3).to(dtype), torch.randn(1, H, T, D, generator=g).to(dtype)
    store = method.new_layer(0, Model())
    kk, vv, slots = store.append(k, v)
    q = torch.randn(1, 3 * H, T, D, generator=g).to(dtype)
    store.after_attention(Step.dense(q, kk, vv))
    return (k.nbytes + v.nbytes) / store.nbytes()


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("T,D,dtype", [(300, 64, torch.float32), (1000, 32, torch.float16)])
@torch.no_grad()
def test_nominal_ratio_is_the_measured_ratio(name, T, D, dtype):
    """Per-layer extras (KVQuant's levels, FP8's scales) and outlier ties are the only slack."""
    cache = CacheSpec(bits=torch.finfo(dtype).bits, head_dim=D, tokens=T)
    for m in CANDIDATES[name]:
        if name == "qjl":  # the ladder's sketch width follows D
            b = m.value_bits
            m = QJL(sketch_dim=D * b, outlier_sketch_dim=D * b // 2, value_bits=b)
        assert measured_ratio(m, T, D, dtype) == pytest.approx(m.nominal_ratio(cache), rel=0.015), m


def test_targets_2_4_8_on_an_fp32_cache():
    """The mapping the first (fp32) evidence runs used (documented in each from_ratio)."""
    picks = {n: [c.from_ratio(r, FP32) for r in (2, 4, 8)] for n, c in
             [("kivi", KIVI), ("flexgen", FlexGen), ("kvquant", KVQuant), ("gear", GEAR), ("qjl", QJL)]}
    assert [m.bits for m in picks["kivi"]] == [8, 4, 1]
    assert [(m.bits, m.group_size) for m in picks["flexgen"]] == [(8, 16), (4, 16), (2, 32)]
    assert [m.bits for m in picks["kvquant"]] == [8, 6, 2]
    assert [m.bits for m in picks["gear"]] == [8, 4, 1]
    assert [m.value_bits for m in picks["qjl"]] == [8, 4, 1]
    zc = [ZipCache.from_ratio(r, FP32) for r in (2, 4, 8)]
    assert [(m.high_bits, m.low_bits) for m in zc] == [(8, 4), (8, 4), (4, 2)]
    for name, ms in picks.items():  # no other candidate is nearer on a log scale
        for r, m in zip((2, 4, 8), ms):
            best = closest(r, CANDIDATES[name], FP32, name)
            assert abs(torch.tensor(m.nominal_ratio(FP32) / r).log()) <= abs(
                torch.tensor(best.nominal_ratio(FP32) / r).log())


def test_targets_2_4_8_in_the_seeds_16_bit_unit():
    """The benchmark's mapping (bf16 model, ratios against a 16-bit cache, as both seeds count)."""
    assert EMBEDDED.bits == 16
    picks = {n: [c.from_ratio(r) for r in (2, 4, 8)] for n, c in
             [("kivi", KIVI), ("flexgen", FlexGen), ("kvquant", KVQuant), ("gear", GEAR), ("qjl", QJL)]}
    assert [m.bits for m in picks["kivi"]] == [8, 2, 1]
    assert KIVI(bits=4).nominal_ratio() == pytest.approx(2.76, abs=0.01)  # the seeds' KIVI-4 ~3.1x at 10k tokens
    assert [(m.bits, m.group_size) for m in picks["flexgen"]] == [(8, 64), (2, 16), (1, 32)]
    assert [m.bits for m in picks["kvquant"]] == [7, 3, 1]
    assert [m.bits for m in picks["gear"]] == [4, 1, 1]
    assert [m.value_bits for m in picks["qjl"]] == [4, 2, 1]
    for name, ms in picks.items():
        for r, m in zip((2, 4, 8), ms):
            best = closest(r, CANDIDATES[name], EMBEDDED, name)
            assert abs(torch.tensor(m.nominal_ratio() / r).log()) <= abs(torch.tensor(best.nominal_ratio() / r).log())


def test_an_fp16_cache_maps_to_more_bits():
    fp16 = CacheSpec(bits=16)
    assert KIVI.from_ratio(4, fp16).bits == 2 and KIVI.from_ratio(4, FP32).bits == 4
    assert KVQuant.from_ratio(4, fp16).bits == 3 and KVQuant.from_ratio(4, FP32).bits == 6


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        CacheSpec(bits=12)
    with pytest.raises(ValueError, match="tokens"):
        CacheSpec(tokens=0)
    with pytest.raises(ValueError, match="KIVI: ratio"):
        KIVI.from_ratio(0.5)
