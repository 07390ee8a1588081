"""H2O (arXiv 2306.14048): accumulated-attention heavy hitters + recent window, against a replay with loops."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.h2o import H2O, h2o_accumulate
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, memory_stays_at_budget,
                          naive_probs, spy)


def test_accumulate_equals_a_loop_over_queries_and_heads():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 3, 9, generator=g), -1)
    acc = torch.rand(2, 2, 6, generator=g)
    ours = h2o_accumulate(acc, probs, num_kv_heads=2)
    ref = torch.zeros(2, 2, 9)
    for b in range(2):
        for h in range(4):
            for i in range(3):
                ref[b, h // 2] += probs[b, h, i] / 2  # mean over the 2 query heads of the group
        ref[b, :, :6] += acc[b]
    assert torch.allclose(ours, ref, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("budget,heavy_fraction", [(12, 0.5), (9, 0.25), (10, 1.0), (8, 0.0)])
def test_kept_sets_equal_a_replay_of_algorithm_1(budget, heavy_fraction):
    """Replay H2O from the queries/keys each step saw: per layer and KV head, a dict slot -> accumulated
    attention (mean over the group's query heads, summed over queries and steps); over budget, keep the
    last n_recent positions and the top heavy hitters among the rest."""
    model, T, steps = tiny_llama(), 24, 5
    cache = KVCache(model, H2O(budget=budget, heavy_fraction=heavy_fraction))
    log = spy(cache)
    model(ids(T, seed=3), cache=cache)
    for t in range(steps):
        model(torch.tensor([[20 + t]]), cache=cache)
    n_heavy = round(budget * heavy_fraction)
    for layer, entries in log.items():
        H_kv = entries[0]["k"].shape[1]
        G = entries[0]["q"].shape[1] // H_kv
        for h in range(H_kv):
            acc, held = {}, []
            for e in entries:
                slots = e["slots"][0, h].tolist()
                held = held + [s for s in slots if s not in held]
                for i in range(e["q"].shape[2]):
                    qpos = slots[-e["q"].shape[2] + i]
                    allowed = torch.tensor([0 <= s <= qpos for s in slots])[None].expand(H_kv, -1)
                    p = naive_probs(e["q"][0, :, i], e["k"][0], allowed, e["scaling"])
                    votes = p[h * G:(h + 1) * G].mean(0).tolist()  # mean over the group's query heads
                    for j, s in enumerate(slots):
                        if s >= 0:
                            acc[s] = acc.get(s, 0.0) + votes[j]
                if len(held) > budget:
                    n = max(held) + 1
                    recent = [s for s in held if s >= n - (budget - n_heavy)]
                    rest = sorted((s for s in held if s not in recent), key=lambda s: -acc[s])
                    held = sorted(recent + rest[:n_heavy])
                assert sorted(s for s in e["kept"][0, h].tolist() if s >= 0) == held, (layer, h)


def test_every_layer_and_head_keeps_the_budget_and_the_recent_window(tiny):
    cache = kept_counts_equal_budget(tiny, H2O(budget=14), budget=14)
    for layer in cache.layers:
        for h in range(2):
            assert set(range(43, 50)) <= set(layer.store.kept_slots()[0, h].tolist())  # 7 recent of 14


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, H2O(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, H2O(ratio=2), steps=4)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, H2O(budget=12))


def test_memory_stays_at_the_budget_while_decoding(tiny):
    memory_stays_at_budget(tiny, H2O(budget=16))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="heavy_fraction"):
        H2O(heavy_fraction=1.5)
    with pytest.raises(ValueError, match="budget"):
        H2O(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        H2O.from_ratio(0.5)
