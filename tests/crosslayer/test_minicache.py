"""MiniCache (arXiv 2405.14366): SLERP, magnitudes, retention and the pair's bytes, against plain formulas."""

import math

import pytest
import torch

from reference_impls import Full, KVCache, make_method
from reference_impls.base import UNIT_BYTES
from reference_impls.crosslayer.minicache import MiniCache, minicache_merge, minicache_restore, slerp
from reference_impls.generation import greedy_generate
from reference_impls.models import tiny_llama
from reference_impls.quantization.ratios import CacheSpec
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def textbook_slerp(a, b, t):
    """Shoemake's SLERP of two unit vectors (D,), in float64."""
    a, b = a.double(), b.double()
    omega = math.acos(max(-1.0, min(1.0, float(a @ b))))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def reference_pair(xp, x, t, gamma):
    """Token by token: the angular distance acos(cos) / pi; a pair is retained when it lies in the top gamma of its
    (batch, head) row's distance range; else each layer restores as its norm times the SLERP of the unit vectors."""
    B, H, T, _ = x.shape
    out_p, out_l = torch.zeros_like(xp), torch.zeros_like(x)
    kept = torch.zeros(B, H, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            unit = [(xp[b, h, i] / xp[b, h, i].norm(), x[b, h, i] / x[b, h, i].norm()) for i in range(T)]
            d = [math.acos(max(-1.0, min(1.0, float(u @ w)))) / math.pi for u, w in unit]
            for i in range(T):
                kept[b, h, i] = gamma > 0 and d[i] >= min(d) + (1 - gamma) * (max(d) - min(d))
                if kept[b, h, i]:
                    out_p[b, h, i], out_l[b, h, i] = xp[b, h, i], x[b, h, i]
                else:
                    e = textbook_slerp(*unit[i], t).float()
                    out_p[b, h, i], out_l[b, h, i] = xp[b, h, i].norm() * e, x[b, h, i].norm() * e
    return out_p, out_l, kept


def pair_states(seed=0):
    """Two layers' states (2, 2, 40, 8): random, a few near-parallel and a few near-opposite token pairs."""
    g = torch.Generator().manual_seed(seed)
    xp, x = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    x[:, :, :5] = 3 * xp[:, :, :5] + 0.05 * torch.randn(2, 2, 5, 8, generator=g)
    x[:, :, 5:8] = -xp[:, :, 5:8] + 0.3 * torch.randn(2, 2, 3, 8, generator=g)
    return xp, x


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
def test_slerp_equals_the_textbook_formula(t):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    ours = slerp(a, b, t)
    ref = torch.stack([textbook_slerp(a[i], b[i], t) for i in range(50)]).float()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(50), atol=1e-5)  # on the sphere
    assert torch.allclose(ours, a if t == 0 else b, atol=1e-5) or 0 < t < 1


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.5, 1.0])
def test_merged_tokens_restore_as_magnitude_times_slerp_and_retained_ones_exactly(gamma):
    xp, x = pair_states()
    e, mp, ml, kept = minicache_merge(xp, x, t=0.6, gamma=gamma)
    ref_p, ref_l, ref_kept = reference_pair(xp, x, 0.6, gamma)
    assert torch.equal(kept, ref_kept)
    idx = kept.flatten().nonzero()[:, 0]
    restored_p = minicache_restore(e, mp, idx, xp.reshape(-1, 8)[idx])
    restored_l = minicache_restore(e, ml, idx, x.reshape(-1, 8)[idx])
    assert torch.allclose(restored_p, ref_p, atol=1e-4) and torch.allclose(restored_l, ref_l, atol=1e-4)
    assert torch.equal(restored_p[kept], xp[kept]) and torch.equal(restored_l[kept], x[kept])  # error exactly 0
    if gamma == 0:
        assert not kept.any()
    elif gamma == 1:
        assert kept.all()
    else:  # each row keeps its farthest pair; near-parallel pairs merge; near-opposite ones stay at gamma 0.5
        assert kept.any(-1).all() and not kept[:, :, :5].any()
        assert kept[:, :, 5:8].all() if gamma == 0.5 else kept.float().mean() < 0.1


@torch.no_grad()
def test_the_cache_merges_layers_2_and_3_of_4_and_attends_with_the_restored_prompt():
    model, x = tiny_llama(num_layers=4), ids(50)
    rec = record_prefill(model, x)
    cache = KVCache(model, MiniCache())  # S = L/2 = 2: one pair (2, 3)
    seen = {}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention
        layer.store.after_attention = lambda step, i=i, orig=orig: (seen.__setitem__(i, step), orig(step))
    model(x, cache=cache)
    for tok in (5, 6):
        model(torch.tensor([[tok]]), cache=cache)
    ref_k = reference_pair(rec.keys[2], rec.keys[3], 0.6, 0.05)
    ref_v = reference_pair(rec.values[2], rec.values[3], 0.6, 0.05)
    for i in range(4):
        k, v = seen[i].keys[:, :, :50], seen[i].values[:, :, :50]  # the prompt's part, on the last decoding step
        if i < 2:
            assert torch.equal(k, rec.keys[i]) and torch.equal(v, rec.values[i])  # unmerged layers: untouched
        else:
            assert torch.allclose(k, ref_k[i - 2], atol=1e-4) and torch.allclose(v, ref_v[i - 2], atol=1e-4)
            assert cache.layers[i].store.tail.k.shape[2] == 2  # decoded tokens stay unmerged


@torch.no_grad()
def test_retaining_every_pair_or_merging_none_decodes_exactly_like_full():
    model, x = tiny_llama(num_layers=4), ids(40)
    for method, same_bytes in ((MiniCache(gamma=1.0), False), (MiniCache(start=1.0), True)):
        full, ours = KVCache(model, Full()), KVCache(model, method)
        assert torch.equal(model(x, cache=full).logits, model(x, cache=ours).logits)
        for t in (9, 10, 11):
            nxt = torch.tensor([[t]])
            assert torch.equal(model(nxt, cache=full).logits, model(nxt, cache=ours).logits)
        assert (ours.nbytes() == full.nbytes()) == same_bytes  # retaining every pair costs more than Full


@torch.no_grad()
def test_bytes_count_the_shared_directions_and_indices_once():
    model, x = tiny_llama(num_layers=4), ids(50)
    cache = KVCache(model, MiniCache(gamma=0.2))
    model(x, cache=cache)
    first, second = cache.layers[2].store, cache.layers[3].store
    n = sum(i.numel() for i in second.idx)  # retained (token, head) pairs, keys and values
    assert n > 0
    B, H, T, D, fp32 = 1, 2, 50, 16, 4
    dense = 2 * B * H * T * D * fp32  # a layer's keys and values
    per_layer = 2 * B * H * T * fp32 + n * D * fp32  # magnitudes of K and V, its retained vectors
    shared = dense + n * 4  # the directions of K and V, the int32 indices of retained pairs
    assert first.nbytes() == per_layer and second.nbytes() == per_layer + shared
    assert cache.nbytes() == 2 * dense + 2 * per_layer + shared


@pytest.mark.parametrize("bits", [16, 4])
@torch.no_grad()
def test_nominal_ratio_is_the_measured_ratio_without_retention(bits):
    model, T = tiny_llama(num_layers=4, dtype=torch.bfloat16), 200
    method = MiniCache(gamma=0.0, bits=bits)
    cache = KVCache(model, method)
    model(ids(T), cache=cache)
    measured = cache.full_nbytes(UNIT_BYTES) / cache.nbytes()
    assert math.isclose(measured, method.nominal_ratio(CacheSpec(head_dim=16, tokens=T), layers=4), rel_tol=1e-9)
    assert measured > (1.25 if bits == 16 else 1.8)  # one pair of 4 layers; KIVI keeps 128 of 200 in full


def test_from_ratio_keeps_the_middle_start_and_picks_the_precision():
    picks = {r: MiniCache.from_ratio(r) for r in (1, 4 / 3, 2, 4, 8)}
    assert [(m.start, m.bits) for m in picks.values()] == [(1.0, 16), (0.5, 16), (0.5, 8), (0.5, 4), (0.0, 2)]
    assert MiniCache.from_ratio(2, bits=16).start == 0.0  # 16 bits reach 2x only by merging every layer: ~1.94x
    assert MiniCache.from_ratio(8, start=0.5).bits == 2 and MiniCache.from_ratio(4, gamma=0.1).gamma == 0.1
    assert make_method("minicache", 4) == MiniCache(bits=4)


@torch.no_grad()
def test_replayed_prefill_equals_live_and_generation_runs():
    model, x = tiny_llama(num_layers=4), ids(60, seed=3)
    for method in (MiniCache(), MiniCache(bits=4, start=0.0)):
        live = KVCache(model, method)
        model(x, cache=live)
        replayed = cache_from_record(model, method, record_prefill(model, x))
        assert replayed.nbytes() == live.nbytes()
        for t in (7, 8):
            a = model(torch.tensor([[t]]), cache=live).logits
            b = model(torch.tensor([[t]]), cache=replayed).logits
            assert torch.allclose(a, b, atol=1e-5)
        gen = greedy_generate(model, KVCache(model, method), [x], 4)
        full = greedy_generate(model, KVCache(model, Full()), [x], 4)
        assert len(gen.tokens) == 4 and gen.kv_bytes < full.kv_bytes
    merged, full = KVCache(model, MiniCache()), KVCache(model, Full())
    model(x, cache=merged), model(x, cache=full)
    nxt = torch.tensor([[7]])
    assert not torch.allclose(model(nxt, cache=merged).logits, model(nxt, cache=full).logits, atol=1e-3)


@pytest.mark.parametrize("knobs,match", [(dict(t=1.5), "t must be a number in"), (dict(gamma=-0.1), "gamma must be"),
                                         (dict(start=2), "start must be"), (dict(bits=3), "bits must be one of")])
def test_bad_knobs_name_the_parameter(knobs, match):
    with pytest.raises(ValueError, match=match):
        MiniCache(**knobs)
