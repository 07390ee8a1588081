"""D2O (arXiv 2406.13035): matching, EMA threshold, weighted merging and the layer density, each against a plain
loop; convexity; causal layer budgets add up; H2O's eviction with sinks; budgets, padding, decoding, errors."""

import dataclasses
import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.h2o import H2O
from reference_impls.generation import greedy_generate
from reference_impls.merging.d2o import (D2O, DensityLayers, d2o_layer_density, d2o_match, d2o_merge,
                                         d2o_threshold)
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, ids, kept_counts_equal_budget,
                          left_padded_batch_equals_batch_one, memory_stays_at_budget)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def plain_d2o(keys, values, kept, out, tau):
    """Per head: each evicted token (cos to its nearest kept key >= tau) joins that key; a kept token becomes
    (e x_c + sum exp(u_e) x_e) / (e + sum exp(u_e)) for x = key and value."""
    groups = {j: [] for j in range(len(kept))}
    for e in range(keys.shape[0]):
        if out[e]:
            sims = [cos(keys[e], keys[i]) for i in kept]
            u = max(sims)
            if u >= tau:
                groups[sims.index(u)].append((e, math.exp(u)))
    new_k, new_v = [], []
    for j, i in enumerate(kept):
        total = math.e + sum(w for _, w in groups[j])
        new_k.append((math.e * keys[i] + sum(w * keys[e] for e, w in groups[j])) / total)
        new_v.append((math.e * values[i] + sum(w * values[e] for e, w in groups[j])) / total)
    return new_k, new_v


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, T, D, W = 2, 2, 14, 6, 5
    keys, values = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:W].sort().values for _ in range(H)])
                       for _ in range(B)])
    hole = torch.zeros(B, H, W, dtype=torch.bool)
    hole[0, 1, -2:] = True  # head (0, 1) keeps 3
    out = torch.ones(B, H, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            out[b, h, idx[b, h][~hole[b, h]]] = False
    return keys, values, idx, hole, out


@pytest.mark.parametrize("tau", [-1.0, 0.2, 0.45])
def test_matching_and_merging_equal_eqs_8_to_12_as_loops(tau):
    keys, values, idx, hole, out = random_case()
    gather = lambda x: x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
    kept_k, kept_v = gather(keys), gather(values)
    u, nearest = d2o_match(keys, kept_k, hole)
    k, v = d2o_merge(keys, values, kept_k, kept_v, u, nearest, out & (u >= tau))
    merged_any = False
    for b in range(2):
        for h in range(2):
            kept = idx[b, h][~hole[b, h]].tolist()
            ref_k, ref_v = plain_d2o(keys[b, h], values[b, h], kept, out[b, h], tau)
            for j in range(len(kept)):
                assert torch.allclose(k[b, h, j], ref_k[j], atol=1e-5)
                assert torch.allclose(v[b, h, j], ref_v[j], atol=1e-5)
                merged_any |= not torch.allclose(k[b, h, j], kept_k[b, h, j])
    assert merged_any


def test_merged_states_are_convex_combinations():
    keys, values, idx, hole, out = random_case(1)
    kept_k = keys.gather(2, idx[..., None].expand(-1, -1, -1, 6))
    u, nearest = d2o_match(keys, kept_k, hole)
    const = torch.full_like(values, 0.7)
    _, v = d2o_merge(keys, const, kept_k, const.gather(2, idx[..., None].expand(-1, -1, -1, 6)), u, nearest, out)
    assert torch.allclose(v, torch.full_like(v, 0.7))  # weights add up to 1
    k, _ = d2o_merge(keys, values, kept_k, kept_k, u, nearest, out)
    assert (k <= keys.amax(2, keepdim=True) + 1e-6).all() and (k >= keys.amin(2, keepdim=True) - 1e-6).all()


def test_the_threshold_is_an_ema_of_the_evicted_tokens_best_similarity():
    u = torch.tensor([[[0.2, 0.4, 0.9]], [[0.5, 0.1, 0.3]]])
    out = torch.tensor([[[True, True, False]], [[False, False, False]]])  # row 1 evicts nothing yet
    tau = d2o_threshold(None, u, out, 0.5)
    assert tau[0] == pytest.approx(0.3) and tau[1].isnan()
    out2 = torch.tensor([[[False, False, True]], [[True, False, True]]])
    tau = d2o_threshold(tau, u, out2, 0.25)
    assert tau[0] == pytest.approx(0.75 * 0.3 + 0.25 * 0.9) and tau[1] == pytest.approx(0.4)  # first: the mean
    assert torch.equal(d2o_threshold(tau, u, torch.zeros_like(out), 0.5), tau)  # nothing evicted: unchanged


def test_layer_density_is_the_official_statistic():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(2, 4, 5, 9, generator=g), -1)
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[1, :, :2] = False  # row 1: two padding keys
    probs[1, :, :, :2] = 0
    ours = d2o_layer_density(probs, valid)
    for b in range(2):
        real = valid[b, 0]
        var = torch.stack([probs[b, h].sum(0)[real].var() for h in range(4)])  # torch.var: unbiased, as official
        ref = ((var - var.min()) / (var.max() - var.min() + 1e-6)).mean()
        assert ours[b] == pytest.approx(float(ref), rel=1e-5)


def test_layer_budgets_follow_density_causally_and_add_up():
    L, n, b = 5, torch.tensor([100]), torch.tensor([25])
    sigma = [0.1, 0.9, 0.4, 0.0, 0.7]
    pol = DensityLayers()
    got = []
    for layer in range(L):
        pol.density[layer] = torch.tensor([sigma[layer]])
        got.append(int(pol.layer_budget(n, b, layer, L, 0)))
    spent, ref = 0, []
    for layer in range(L):
        w = [math.exp(-s) for s in sigma[: layer + 1]]
        left = L - layer - 1
        share = 1.0 if left == 0 else w[-1] / (w[-1] + left * sum(w) / len(w))
        ref.append(max(1, round((L * 25 - spent) * share)))
        spent += min(ref[-1], 100)
    assert got == ref and sum(got) == L * 25
    assert got[3] > got[2] > got[1]  # denser (lower sigma) layers keep more than the layer before them


@torch.no_grad()
def test_on_the_model_each_layer_keeps_its_density_budget_and_the_total_is_uniforms():
    model = tiny_llama(num_layers=4)
    cache = KVCache(model, D2O(ratio=4))
    model(ids(96), cache=cache)
    per_layer = [int((layer.store.kept_slots()[0, 0] >= 0).sum()) for layer in cache.layers]
    assert sum(per_layer) == 4 * 24 and len(set(per_layer)) > 1
    for layer in cache.layers:  # the 4 sinks are kept everywhere
        assert set(range(4)) <= set(layer.store.kept_slots()[0, 0].tolist())


def test_uniform_layers_keep_the_budget_and_h2os_tokens_plus_sinks(tiny):
    kept_counts_equal_budget(tiny, D2O(budget=14, layers="uniform"), budget=14)
    x = ids(40)
    d2o, h2o = KVCache(tiny, D2O(budget=12, layers="uniform", n_sink=0)), KVCache(tiny, H2O(budget=12))
    with torch.no_grad():
        for c in (d2o, h2o):
            tiny(x, cache=c)
    assert torch.equal(d2o.layers[0].store.kept_slots(), h2o.layers[0].store.kept_slots())
    assert not torch.allclose(d2o.layers[0].store.v, h2o.layers[0].store.v)  # evicted tokens merged


def test_layers_policy_survives_replace_and_strings():
    assert isinstance(D2O().layers, DensityLayers)
    assert isinstance(dataclasses.replace(D2O(), budget=5).layers, DensityLayers)
    assert not isinstance(dataclasses.replace(D2O(), layers="pyramid").layers, DensityLayers)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, D2O(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, D2O(ratio=2), steps=3)


def test_memory_stays_at_the_budget_while_decoding_and_generation_runs(tiny):
    memory_stays_at_budget(tiny, D2O(budget=16))
    gen = greedy_generate(tiny, KVCache(tiny, D2O(ratio=4)), [ids(60)], 6)
    assert len(gen.tokens) == 6 and gen.full_kv_bytes / gen.kv_bytes > 1.8  # fp32 tiny model: 2 x the 16-bit unit


def test_bad_parameters_are_rejected():
    for knob, value in [("beta", 0), ("beta", 1.5), ("n_sink", -1), ("heavy_fraction", 2)]:
        with pytest.raises(ValueError, match=knob):
            D2O(**{knob: value})
    with pytest.raises(ValueError, match="layers"):
        D2O(layers="dense")
    with pytest.raises(ValueError, match="ratio"):
        D2O.from_ratio(0.5)
