"""PyramidKV (arXiv 2406.02069): the pyramid schedule, its total, and decoding with per-layer budgets."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import PyramidKV, StreamingLLM
from reference_impls.eviction.policies import Pyramid, pyramid_budgets
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one, memory_stays_at_budget)


def official_schedule(n, b, L, w, beta):
    """The KVCache-Factory formula in exact arithmetic: b_l = w + max - l (max - min) / (L - 1); uniform when
    n < 2 (b - w) (its `q_len < (max_capacity_prompt - window_size) * 2` branch)."""
    if n < 2 * (b - w):
        return [b] * L
    lo = (b - w) / beta
    hi = 2 * (b - w) - lo
    if hi > n - w:
        hi, lo = n - w, 2 * (b - w) - (n - w)
    return [w + hi - l * (hi - lo) / (L - 1) for l in range(L)]


@pytest.mark.parametrize("n,b,L,w,beta", [(1500, 375, 30, 64, 20), (1500, 188, 30, 64, 20), (1500, 1200, 30, 64, 20),
                                          (200, 50, 7, 8, 5), (97, 31, 4, 0, 1)])
def test_schedule_is_the_official_pyramid_rounded_to_the_uniform_total(n, b, L, w, beta):
    got = pyramid_budgets(torch.tensor([n]), torch.tensor([b]), L, w, beta)[0]
    exact = official_schedule(n, b, L, w, beta)
    assert int(got.sum()) == L * b  # same total as uniform allocation
    assert all(abs(g - e) < 1 for g, e in zip(got.tolist(), exact))  # each layer within rounding
    assert all(x >= y for x, y in zip(got.tolist(), got.tolist()[1:]))  # non-increasing with depth
    assert int(got.max()) <= n


def test_falls_back_to_uniform_when_the_pyramid_does_not_fit():
    got = pyramid_budgets(torch.tensor([100, 100, 1500]), torch.tensor([40, 10, 815]), 5, window=16, beta=20)
    assert got[1].tolist() == [10] * 5 and int(got[0].sum()) == 200
    assert got[2].tolist() == [815] * 5  # 1500 < 2 (815 - 16): below ~1.84x the official code is uniform


@torch.no_grad()
def test_total_kept_across_layers_equals_the_uniform_total_and_layers_differ():
    model, T = tiny_llama(num_layers=6), 80
    cache = KVCache(model, PyramidKV(ratio=4, window=4, layers=Pyramid(beta=4)))
    model(ids(T), cache=cache)
    kept = [layer.store.kept_slots() for layer in cache.layers]
    counts = [int((k[0, 0] >= 0).sum()) for k in kept]
    assert sum(counts) == 6 * 20 and counts[0] > counts[-1]
    for k in kept:  # every head of a layer keeps the layer's budget, window included
        assert ((k >= 0).sum(-1) == k.shape[-1]).all() and (k[..., -4:] == torch.arange(T - 4, T)).all()


@torch.no_grad()
def test_decoding_with_per_layer_budgets_equals_attention_over_each_layers_kept_tokens():
    """kvpress 0.5.5's PyramidKVPress failed in decoding on this model; here every layer keeps a different
    number of tokens and each decoded token must equal the per-layer masked reference."""
    cache = decode_matches_reference(tiny_llama(num_layers=4), PyramidKV(budget=14, window=4, layers=Pyramid(beta=3)),
                                     T=40, steps=6)
    widths = [layer.store.kept_slots().shape[-1] for layer in cache.layers]
    assert len(set(widths)) == 4 and sum(w - 6 for w in widths) == 4 * 14


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, PyramidKV(budget=43), same_bytes=True)


def test_any_scorer_takes_the_pyramid_and_keeps_its_decoding_behaviour(tiny):
    p = StreamingLLM(ratio=4, n_sink=2, layers="pyramid")
    assert isinstance(p.layers, Pyramid) and p.evict_while_decoding
    memory_stays_at_budget(tiny, p)  # StreamingLLM inside keeps memory at the per-layer budgets


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, PyramidKV(ratio=2, window=4, layers=Pyramid(beta=2)), steps=2)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        Pyramid(beta=0.5)
    with pytest.raises(ValueError, match="layers must be one of uniform, pyramid"):
        PyramidKV(layers="adaptive")
    with pytest.raises(ValueError, match="ratio"):
        PyramidKV.from_ratio(0.5)
