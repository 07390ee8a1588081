"""KeyDiff (arXiv 2504.15364): negative cosine similarity to the mean normalised key, top-k per head."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import KeyDiff
from reference_impls.eviction.keydiff import keydiff_scores
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one, spy)


def test_scores_equal_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 17, 8, generator=g)
    got = keydiff_scores(k)
    for b in range(2):
        for h in range(3):
            unit = [k[b, h, j] / k[b, h, j].norm() for j in range(17)]
            anchor = sum(unit) / 17
            for j in range(17):
                assert abs(got[b, h, j] + unit[j] @ anchor / anchor.norm()) < 1e-5


def test_anchor_ignores_padding_and_holes():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 12, 8, generator=g)
    valid = torch.ones(1, 2, 12, dtype=torch.bool)
    valid[..., :4] = False
    assert torch.allclose(keydiff_scores(k, valid)[..., 4:], keydiff_scores(k[..., 4:, :]), atol=1e-6)


@torch.no_grad()
def test_kept_tokens_are_the_top_scores_in_every_layer_and_head():
    model, T, budget = tiny_llama(), 50, 13
    cache = KVCache(model, KeyDiff(budget=budget))
    log = spy(cache)
    model(ids(T, seed=3), cache=cache)
    for i, layer in enumerate(cache.layers):
        kept = layer.store.kept_slots()
        assert kept.shape == (1, 2, budget)
        ref = keydiff_scores(log[i][0]["k"]).topk(budget, -1).indices.sort(-1).values
        assert torch.equal(kept, ref)


def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    decode_matches_reference(tiny_llama(), KeyDiff(budget=12))


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, KeyDiff(budget=40), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, KeyDiff(ratio=2), steps=2)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        KeyDiff(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        KeyDiff.from_ratio(0.5)
