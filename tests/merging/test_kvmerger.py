"""KVMerger (arXiv 2407.08454): merging sets, pivots and Gaussian-kernel merging against Algorithm 1's threshold
scan written as a loop, at the budget's threshold and at a fixed one; convexity; budgets, padding, decoding."""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.base import Model, Step
from reference_impls.eviction.policies import Adaptive, Threshold
from reference_impls.generation import greedy_generate
from reference_impls.merging.kvmerger import KVMerger

from evict_checks import (budget_at_least_length_is_full, ids, kept_counts_equal_budget,
                          left_padded_batch_equals_batch_one)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def plain_attention(q, k, scaling):
    """Per KV head, the attention each key received from every (causal) query, summed, mean over the group."""
    H, T = q.shape[0], k.shape[1]
    G = H // k.shape[0]
    out = torch.zeros(k.shape[0], T)
    for h in range(H):
        for t in range(T):
            row = torch.softmax(torch.stack([q[h, t] @ k[h // G, j] * scaling for j in range(t + 1)]), 0)
            out[h // G, : t + 1] += row / G
    return out


def algorithm_1(keys, values, attn, tau):
    """Scan from the last token back: a token joins the current set while its key's cosine similarity to the next
    token's key is >= tau. Each set merges into its most attended token with Gaussian weights
    g_i = exp(-|k_i - k_p|^2 / 2 sigma^2), sigma = sum |k_i - k_p| / (sqrt 2 |S|), normalised over the set."""
    T = keys.shape[0]
    sets, cur = [], [T - 1]
    for i in range(T - 2, -1, -1):
        if cos(keys[i], keys[i + 1]) >= tau:
            cur.append(i)
        else:
            sets.append(sorted(cur))
            cur = [i]
    sets = [sorted(cur)] + sets[::-1]
    pivots, ks, vs = [], [], []
    for s in sets:
        p = max(s, key=lambda i: (float(attn[i]), -i))
        d = [float((keys[i] - keys[p]).norm()) for i in s]
        sigma = sum(d) / (math.sqrt(2) * len(s))
        g = [math.exp(-x * x / (2 * sigma * sigma)) if sigma > 0 else 1.0 for x in d]
        w = [x / sum(g) for x in g]
        pivots.append(p)
        ks.append(sum(wi * keys[i] for wi, i in zip(w, s)))
        vs.append(sum(wi * values[i] for wi, i in zip(w, s)))
    return pivots, ks, vs


def threshold_for(keys, n_sets):
    """A threshold between the (n_sets - 1)-th and n_sets-th least similar adjacent pairs: n_sets sets."""
    sims = sorted(cos(keys[i], keys[i + 1]) for i in range(keys.shape[0] - 1)) + [2.0]
    return -2.0 if n_sets == 1 else (sims[n_sets - 2] + sims[n_sets - 1]) / 2


def smooth_case(T=24, seed=0):
    """Keys that drift slowly along the sequence (adjacent ones alike, as the paper observes), random values."""
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(1, 2, T, 8, generator=g).mul(0.35).cumsum(2) + torch.randn(1, 2, 1, 8, generator=g)
    q = torch.randn(1, 4, T, 8, generator=g)
    return q, walk, torch.randn(1, 2, T, 8, generator=g)


def run(method, q, k, v):
    store = method.new_layer(0, Model())
    store.append(k, v)
    store.after_attention(Step.dense(q, k, v))
    return store


@pytest.mark.parametrize("budget", [1, 5, 11, 23])
def test_kept_pivots_and_merged_states_equal_algorithm_1_at_the_budgets_threshold(budget):
    q, k, v = smooth_case()
    store = run(KVMerger(budget=budget), q, k, v)
    attn = plain_attention(q[0], k[0], 8 ** -0.5)
    for h in range(2):
        pivots, ks, vs = algorithm_1(k[0, h], v[0, h], attn[h], threshold_for(k[0, h], budget))
        assert store.kept_slots()[0, h].tolist() == pivots
        assert torch.allclose(store.k[0, h], torch.stack(ks), atol=1e-5)
        assert torch.allclose(store.v[0, h], torch.stack(vs), atol=1e-5)


@pytest.mark.parametrize("tau", [0.6, 0.8, 0.9])
def test_threshold_heads_give_the_papers_fixed_threshold(tau):
    q, k, v = smooth_case(seed=3)
    store = run(KVMerger(heads=Threshold(min_score=-tau)), q, k, v)
    attn = plain_attention(q[0], k[0], 8 ** -0.5)
    kept = store.kept_slots()[0]
    for h in range(2):
        pivots, ks, vs = algorithm_1(k[0, h], v[0, h], attn[h], tau)
        assert [s for s in kept[h].tolist() if s >= 0] == pivots
        n = len(pivots)
        assert torch.allclose(store._padded(store.v, 0)[0, h, :n] if store.counts is not None else store.v[0, h, :n],
                              torch.stack(vs), atol=1e-5)


def test_merged_states_are_convex_combinations_of_their_set():
    q, k, v = smooth_case(seed=1)
    const = torch.full_like(v, -1.5)
    assert torch.allclose(run(KVMerger(budget=6), q, k, const).v, torch.full((1, 2, 6, 8), -1.5))
    store = run(KVMerger(budget=6), q, k, v)
    assert (store.k <= k.amax(2, keepdim=True) + 1e-6).all() and (store.k >= k.amin(2, keepdim=True) - 1e-6).all()


def test_adaptive_heads_split_the_layers_sets_by_one_threshold():
    q, k, v = smooth_case(seed=2)
    store = run(KVMerger(budget=8, heads=Adaptive(alpha=0.0)), q, k, v)
    kept = store.kept_slots()[0]
    counts = (kept >= 0).sum(-1)
    assert int(counts.sum()) == 16  # the layer's 2 x 8 sets, shared by similarity
    attn = plain_attention(q[0], k[0], 8 ** -0.5)
    for h in range(2):  # each head holds the pivots of its own sets at its count
        pivots, _, _ = algorithm_1(k[0, h], v[0, h], attn[h], threshold_for(k[0, h], int(counts[h])))
        assert [s for s in kept[h].tolist() if s >= 0] == pivots


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, KVMerger(budget=14), budget=14)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, KVMerger(budget=budget), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, KVMerger(ratio=2), steps=3)


@torch.no_grad()
def test_generation_runs_and_decoded_tokens_are_kept_as_they_come(tiny):
    cache = KVCache(tiny, KVMerger(ratio=4))
    gen = greedy_generate(tiny, cache, [ids(60)], 6)
    assert len(gen.tokens) == 6 and gen.full_kv_bytes / gen.kv_bytes > 1.8  # fp32 tiny model: 2 x the 16-bit unit
    kept = cache.layers[0].store.kept_slots()[0, 0].tolist()
    assert kept[-5:] == list(range(60, 65)) and len(kept) == 15 + 5  # prefill only


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="ratio"):
        KVMerger.from_ratio(0.5)
    with pytest.raises(ValueError, match="budget"):
        KVMerger(budget=0)
    with pytest.raises(ValueError, match="heads"):
        KVMerger(heads="pivotal")
