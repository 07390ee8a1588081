"""TOVA (arXiv 2401.06104): last query's attention averaged over heads, one kept set per layer."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.tova import TOVA, tova_scores
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, memory_stays_at_budget,
                          naive_probs, spy)


def test_scores_equal_the_head_average_of_the_last_querys_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    ours = tova_scores(q, k, 0.3)
    for b in range(2):
        ref = naive_probs(q[b, :, 0], k[b], torch.ones(3, 11, dtype=torch.bool), 0.3).mean(0)  # all 6 heads
        for h in range(3):
            assert torch.allclose(ours[b, h], ref, atol=1e-6)


@torch.no_grad()
def test_each_step_keeps_the_top_tokens_of_the_last_query_and_all_heads_agree():
    """Replay: after every step, kept = the `budget` tokens the step's last query attends to most (heads
    averaged), so each decoding step evicts exactly one token."""
    model, budget = tiny_llama(), 10
    cache = KVCache(model, TOVA(budget=budget))
    log = spy(cache)
    model(ids(30, seed=3), cache=cache)
    for t in range(5):
        model(torch.tensor([[20 + t]]), cache=cache)
    for layer, entries in log.items():
        for e in entries:
            slots = e["slots"][0, 0]
            p = naive_probs(e["q"][0, :, -1], e["k"][0], (slots >= 0)[None].expand(e["k"].shape[1], -1),
                            e["scaling"]).mean(0)
            p = p.masked_fill(slots < 0, -1.0)
            expect = sorted(slots[p.topk(budget).indices].tolist())
            for h in range(e["kept"].shape[1]):
                assert sorted(e["kept"][0, h].tolist()) == expect, layer


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, TOVA(budget=13), budget=13)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, TOVA(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, TOVA(ratio=2), steps=4)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, TOVA(budget=12))


def test_memory_stays_at_the_budget_while_decoding(tiny):
    memory_stays_at_budget(tiny, TOVA(budget=16))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        TOVA(budget=-3)
    with pytest.raises(ValueError, match="ratio"):
        TOVA(ratio=0.5)
