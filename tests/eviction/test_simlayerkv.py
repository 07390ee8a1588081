"""SimLayerKV (arXiv 2410.13846): laziness from the last token's attention, lazy layers trimmed to initial + recent
tokens, the others whole; bytes follow the number of lazy layers; padding and decoding."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import SimLayerKV
from reference_impls.eviction.simlayerkv import laziness, lazy_keep
from reference_impls.methods import make_method
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one, naive_probs, spy)


def loop_laziness(q_last, k, scaling, T, b, n_initial):
    """The official measure with loops: the last token's attention, mean over query heads, summed over the first
    min(n_initial, b) and the last b - that keys (a union)."""
    first = min(n_initial, b)
    keep = torch.tensor([j < first or j >= T - (b - first) for j in range(T)])
    probs = naive_probs(q_last, k, torch.ones(k.shape[0], T, dtype=torch.bool), scaling)  # (H, T)
    return float(sum(probs[h][keep].sum() for h in range(probs.shape[0])) / probs.shape[0]), keep


@torch.no_grad()
@pytest.mark.parametrize("b", [20, 3])
def test_a_layer_is_lazy_when_its_last_token_attends_to_initial_and_recent_tokens_above_the_threshold(b):
    model, T = tiny_llama(num_layers=4), 50
    probe = KVCache(model, SimLayerKV(budget=b, threshold=1.0))  # never lazy: record the steps
    log = spy(probe)
    model(ids(T, seed=3), cache=probe)
    masses = [loop_laziness(log[i][0]["q"][0, :, -1], log[i][0]["k"][0], log[i][0]["scaling"], T, b, 4)
              for i in range(4)]
    delta = sorted(m for m, _ in masses)[1] + 1e-6  # between the two least and the two most lazy layers
    cache = KVCache(model, SimLayerKV(budget=b, threshold=delta))
    model(ids(T, seed=3), cache=cache)
    for (mass, keep), layer in zip(masses, cache.layers):
        kept = layer.store.kept_slots()
        if mass > delta:
            assert kept[0].tolist() == [torch.nonzero(keep).flatten().tolist()] * 2
        else:
            assert kept is None  # a non-lazy layer keeps its whole cache, no index
    assert sum(layer.store.kept_slots() is not None for layer in cache.layers) == 2


def test_laziness_averages_real_queries_and_heads_over_a_union_of_initial_and_recent_keys():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 3, 12, generator=g), -1)
    q_real = torch.tensor([[True, True, True], [False, True, True]])
    pos = torch.arange(12).expand(2, 2, 12)
    keep = lazy_keep(pos, torch.tensor([12, 12]), torch.tensor([6, 2]), 4)
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 10, 11] and keep[1, 0].nonzero().flatten().tolist() == [0, 1]
    got = laziness(probs, q_real, keep)
    for b in range(2):
        rows = [probs[b, h, i][keep[b, h // 2]].sum() for h in range(4) for i in range(3) if q_real[b, i]]
        assert abs(float(got[b]) - float(sum(rows) / len(rows))) < 1e-6


@torch.no_grad()
def test_bytes_follow_the_number_of_lazy_layers():
    """L n / (lazy b + (L - lazy) n) of a full cache, plus the int32 index of the lazy layers."""
    model, T, b = tiny_llama(num_layers=4), 60, 15
    for delta in (0.0, 1.0):  # every layer lazy, none lazy
        cache = KVCache(model, SimLayerKV(budget=b, threshold=delta))
        model(ids(T), cache=cache)
        lazy = sum(layer.store.kept_slots() is not None for layer in cache.layers)
        assert lazy == (4 if delta == 0.0 else 0)
        per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head dim 16, fp32
        assert cache.nbytes() == lazy * b * (per_token + 2 * 4) + (4 - lazy) * T * per_token


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, SimLayerKV(budget=43, threshold=0.0), same_bytes=True)


def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    decode_matches_reference(tiny_llama(), SimLayerKV(budget=15, threshold=0.0))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    c = left_padded_batch_equals_batch_one(tiny, SimLayerKV(ratio=2, threshold=0.0), steps=3)
    held = c.layers[1].store.kept_slots()
    prompt = (held >= 0) & (held < 30)
    assert prompt[0].sum(-1).tolist() == [15, 15] and prompt[1].sum(-1).tolist() == [11, 11]


@torch.no_grad()
def test_a_padded_batch_decides_per_row(tiny):
    """Row 0 lazy, row 1 not: each row keeps what it keeps alone (row 1 everything)."""
    a, b = ids(30, seed=5), ids(22, seed=6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    probe = KVCache(tiny, SimLayerKV(ratio=2, threshold=1.0))
    log = spy(probe)
    tiny(batch, attention_mask=mask, cache=probe)
    e = log[1][0]
    masses = [loop_laziness(e["q"][r, :, -1], e["k"][r, :, 8 * r:], e["scaling"], n, n // 2 if r else 15, 4)[0]
              for r, n in ((0, 30), (1, 22))]
    delta = (masses[0] + masses[1]) / 2
    lazy_row = 0 if masses[0] > delta else 1
    c = KVCache(tiny, SimLayerKV(ratio=2, threshold=delta))
    tiny(batch, attention_mask=mask, cache=c)
    held = c.layers[1].store.kept_slots()
    counts = (held >= 0).sum(-1)
    assert counts[lazy_row].tolist() == [15 if lazy_row == 0 else 11] * 2
    assert counts[1 - lazy_row].tolist() == [30 if lazy_row == 1 else 22] * 2


@torch.no_grad()
def test_under_a_budgeted_head_policy_every_layer_keeps_its_budget_as_a_lazy_one(tiny):
    """heads="uniform": each head keeps the first 4 and the last b - 4 tokens whatever the attention."""
    cache = KVCache(tiny, SimLayerKV(budget=15, threshold=1.0, heads="uniform"))
    tiny(ids(50), cache=cache)
    for layer in cache.layers:
        assert layer.store.kept_slots()[0].tolist() == [list(range(4)) + list(range(39, 50))] * 2


def test_made_from_its_id_and_a_ratio():
    m = make_method("simlayerkv:threshold=0.65", 4)
    assert isinstance(m, SimLayerKV) and m.ratio == 4 and m.threshold == 0.65 and m.n_initial == 4


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="threshold"):
        SimLayerKV(threshold=1.5)
    with pytest.raises(ValueError, match="n_initial"):
        SimLayerKV(n_initial=-1)
    with pytest.raises(ValueError, match="n_last"):
        SimLayerKV(n_last=0)
    with pytest.raises(ValueError, match="heads must be one of"):
        SimLayerKV(heads="pyramid")
    with pytest.raises(ValueError, match="ratio"):
        SimLayerKV.from_ratio(0.5)
