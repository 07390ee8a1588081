"""KNorm (arXiv 2406.11430): keep the keys with the lowest L2 norm, per KV head."""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.knorm import KNorm, knorm_scores
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, spy)


def test_scores_are_minus_the_euclidean_norm():
    k = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    ours = knorm_scores(k)
    for b, h, t in [(0, 0, 0), (1, 2, 6), (0, 1, 3)]:
        assert math.isclose(ours[b, h, t].item(), -math.sqrt(sum(x * x for x in k[b, h, t].tolist())), rel_tol=1e-6)


@torch.no_grad()
def test_kept_are_the_lowest_norm_keys_in_every_layer_and_head():
    model, budget = tiny_llama(), 11
    cache = KVCache(model, KNorm(budget=budget))
    log = spy(cache)
    x = torch.randperm(125, generator=torch.Generator().manual_seed(1))[:40][None] + 3  # distinct ids: in layer 0
    model(x, cache=cache)  # a key's norm depends on the token id only (RoPE keeps norms), so repeats would tie
    for layer, entries in log.items():
        k = entries[0]["k"][0]
        for h in range(k.shape[0]):
            norms = [math.sqrt(sum(x * x for x in row)) for row in k[h].tolist()]
            expect = sorted(sorted(range(len(norms)), key=lambda t: norms[t])[:budget])
            assert entries[0]["kept"][0, h].tolist() == expect, (layer, h)


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, KNorm(budget=13), budget=13)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, KNorm(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, KNorm(ratio=2))


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, KNorm(budget=12))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        KNorm(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        KNorm.from_ratio(0.99)
