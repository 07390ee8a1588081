"""SqueezeAttention (arXiv 2404.04793): the cosine formula, 1-D k-means, the budget split, per-layer budgets on the
tiny model against a plain forward, any scorer inside, Full, decoding, padding and errors."""

import itertools
import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.base import Model
from reference_impls.eviction import H2O, StreamingLLM
from reference_impls.eviction.policies import Squeeze, kmeans_1d, squeeze_budgets
from reference_impls.eviction.squeezeattention import SqueezeAttention, attention_similarity, layer_similarities
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_held, ids,
                          left_padded_batch_equals_batch_one, memory_stays_at_budget)


def test_similarity_is_the_mean_cosine_between_a_layers_input_and_input_plus_attention():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    a = torch.tensor([[[0.0, 1.0], [0.0, -1.0], [-3.0, 0.0]]])
    cos = []
    for u, w in zip(x[0].tolist(), a[0].tolist()):
        v = [ui + wi for ui, wi in zip(u, w)]
        cos.append(sum(ui * vi for ui, vi in zip(u, v)) / math.hypot(*u) / math.hypot(*v))
    assert cos[0] == pytest.approx(math.sqrt(0.5)) and cos[1] == pytest.approx(1.0)
    assert attention_similarity(x, a).item() == pytest.approx(sum(cos) / 3, abs=1e-6)


def brute_kmeans_cost(x, k):
    """The least within-cluster sum of squares over every assignment of the values to k non-empty clusters."""
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        if len(set(labels)) < k:
            continue
        cost = 0.0
        for c in range(k):
            vals = [v for v, lab in zip(x, labels) if lab == c]
            mu = sum(vals) / len(vals)
            cost += sum((v - mu) ** 2 for v in vals)
        best = min(best, cost)
    return best


def test_kmeans_finds_the_hand_made_groups_and_the_brute_force_optimum():
    x = torch.tensor([0.90, 0.10, 0.50, 0.95, 0.12, 0.55, 0.93])
    assert kmeans_1d(x, 3).tolist() == [2, 0, 1, 2, 0, 1, 2]  # 0 = the lowest centre
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.rand(7, generator=g)
        labels = kmeans_1d(x, 3)
        cost = sum(float(((x[labels == c] - x[labels == c].mean()) ** 2).sum()) for c in range(3))
        assert cost == pytest.approx(brute_kmeans_cost(x.tolist(), 3), abs=1e-9)
        centres = [float(x[labels == c].mean()) for c in range(3)]
        assert centres == sorted(centres)
    assert kmeans_1d(torch.tensor([0.3, 0.7]), 3).tolist() == [0, 1]  # fewer layers than groups


def test_budgets_follow_the_official_split_and_add_up():
    sim = torch.tensor([[0.90, 0.10, 0.50, 0.95, 0.12, 0.55, 0.93]])
    n, b, p = torch.tensor([1000]), torch.tensor([200]), 0.4
    got = squeeze_budgets(sim, n, b, p)[0]
    low = [0, 3, 6]  # the highest-similarity group
    a = (7 * 200 - 3 * p * 200) / 4  # official: (L ini - |class 3| KV_class3) / (L - |class 3|)
    assert [int(got[i]) for i in low] == [80] * 3
    assert all(abs(int(got[i]) - a) < 1 for i in range(7) if i not in low) and int(got.sum()) == 7 * 200
    capped = squeeze_budgets(sim, torch.tensor([300]), torch.tensor([250]), p, window=8)[0]  # a = 360 > n
    assert int(capped.max()) <= 300 and int(capped.sum()) == 7 * 250 and int(capped.min()) > 8
    same = squeeze_budgets(torch.full((1, 7), 0.5), n, b, p)[0]  # one cluster: uniform
    assert same.tolist() == [200] * 7 and squeeze_budgets(sim, n, b, 1.0)[0].tolist() == [200] * 7


@torch.no_grad()
def reference_similarities(model, x):
    """Per layer: the mean cosine of (x, x + attn(norm(x))), x from transformers' output_hidden_states and attn the
    layer's own attention module called directly (causal SDPA without a cache)."""
    hs = model(x, output_hidden_states=True).hidden_states
    pos = torch.arange(x.shape[1])[None]
    out = []
    for layer, block in enumerate(model.model.layers):
        h = hs[layer]
        a = block.self_attn(block.input_layernorm(h), position_embeddings=model.model.rotary_emb(h, pos),
                            attention_mask=None)[0]
        cos = torch.nn.functional.cosine_similarity(h, h + a, dim=-1)
        out.append(cos.mean())
    return torch.stack(out)[None]


@torch.no_grad()
@pytest.mark.parametrize("scorer", ["h2o", "window"])
def test_each_layer_keeps_its_squeeze_budget_chosen_by_the_scorer(scorer):
    model, x, T = tiny_llama(), ids(40, seed=1), 40
    cache = KVCache(model, SqueezeAttention(ratio=4, scorer=scorer))
    model(x, cache=cache)
    ref = reference_similarities(model, x)
    assert torch.allclose(layer_similarities(cache.model_info)(torch.tensor([T])), ref, atol=1e-5)
    want = squeeze_budgets(ref, torch.tensor([T]), torch.tensor([10]), 0.38)[0]  # 2 layers: 2 groups, 4 and 16
    assert sorted(want.tolist()) == [4, 16]
    for layer, b in zip(cache.layers, want.tolist()):
        kept = layer.store.kept_slots()
        assert kept.shape == (1, 2, b)
        alone = KVCache(model, H2O(budget=b) if scorer == "h2o" else StreamingLLM(budget=b, n_sink=0))
        model(x, cache=alone)  # the scorer with this layer's budget in every layer keeps the same tokens here
        assert torch.equal(kept, alone.layers[layer.store.layer_idx].store.kept_slots())


@pytest.mark.parametrize("budget", [43, 100])  # the scorers evict while decoding: b must hold the 3 decoded tokens
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, SqueezeAttention(budget=budget, scorer="window"), same_bytes=True)
    budget_at_least_length_is_full(tiny, SqueezeAttention(budget=budget))  # H2O holds its scores too


def test_generation_evicts_each_layer_to_its_budget_and_attends_over_what_it_holds():
    cache, _ = generation_equals_attention_over_held(tiny_llama(), SqueezeAttention(ratio=2))
    assert sorted(layer.store.kept_slots().shape[-1] for layer in cache.layers) == [8, 32]  # 40 prompt tokens
    memory_stays_at_budget(tiny_llama(), SqueezeAttention(budget=10, scorer="streamingllm"))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, SqueezeAttention(ratio=2, scorer="streamingllm"))


def test_bad_parameters_are_rejected_and_from_ratio_works():
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\]"):
        SqueezeAttention(p=0)
    with pytest.raises(ValueError, match="groups must be an int >= 2"):
        SqueezeAttention(groups=1)
    with pytest.raises(ValueError, match="scorer must be one of h2o, streamingllm, window"):
        SqueezeAttention(scorer="tova")
    with pytest.raises(ValueError, match="layers must be one of uniform, pyramid"):
        SqueezeAttention(layers="adaptive")
    with pytest.raises(ValueError, match="similarities are unknown"):
        Squeeze().layer_budget(torch.tensor([10]), torch.tensor([5]), 0, 2, 0)
    with pytest.raises(ValueError, match="needs Model.trace"):
        SqueezeAttention().new_layer(0, Model())
    m = SqueezeAttention.from_ratio(4)
    assert m.ratio == 4 and isinstance(m.layers, Squeeze) and isinstance(m.scorer, H2O)
    assert isinstance(SqueezeAttention(scorer=StreamingLLM(n_sink=2)).scorer, StreamingLLM)
