"""CAKE (arXiv 2503.12491): preference, indicator, the cascade's stage budgets and end state, its memory bound,
composition with a quantizer, padding and decoding, against plain references."""

import math

import pytest
import torch

from reference_impls import Compose, KVCache
from reference_impls.eviction import CAKE
from reference_impls.eviction.cake import cake_indicator, cake_preference
from reference_impls.eviction.policies import Pyramid, cascade_budgets, proportional_budgets, pyramid_budgets
from reference_impls.methods import make_method
from reference_impls.models import tiny_llama
from reference_impls.quantization import KIVI

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, ids,
                          left_padded_batch_equals_batch_one, naive_probs, reference_logits, spy)


def ref_split(weights, total, cap):
    """Shares of `total` in proportion to `weights`, none above `cap` (excess re-spread), largest remainder."""
    m = len(weights)
    share, free = [0.0] * m, set(range(m))
    while free:
        rest = total - sum(share[i] for i in range(m) if i not in free)
        ws = sum(weights[i] for i in free)
        for i in free:
            share[i] = rest * (weights[i] / ws if ws > 0 else 1 / len(free))
        over = [i for i in free if share[i] > cap]
        if not over:
            break
        for i in over:
            share[i] = cap
            free.discard(i)
    out = [math.floor(s) for s in share]
    missing = round(sum(share) - sum(out))
    for i in sorted(range(m), key=lambda i: (-(share[i] - out[i]), i))[:missing]:
        out[i] += 1
    return out


@pytest.mark.parametrize("weights,total,cap", [([3.0, 1.0, 2.0], 60, 100), ([5.0, 1.0, 1.0, 1.0], 40, 12),
                                               ([0.0, 0.0, 1.0], 30, 12), ([1.0, 2.0], 50, 20), ([0.3, 0.7, 1e-9], 17, 9)])
def test_proportional_budgets_equal_water_filling_written_with_loops(weights, total, cap):
    got = proportional_budgets(torch.tensor([weights]), torch.tensor([total]), torch.tensor([cap]))[0].tolist()
    assert got == ref_split(weights, total, cap)
    assert sum(got) == min(total, len(weights) * cap) and max(got) <= cap


def test_stage_budgets_split_the_whole_models_prefix_budget_over_the_prefilled_layers():
    prefs = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    got = cascade_budgets(prefs, torch.tensor([200, 20]), torch.tensor([30, 20]), num_layers=4, window=6)
    assert got[0].tolist() == [6 + s for s in ref_split([2, 1, 1], 4 * 24, 194)]  # 96 prefix tokens over 3 layers
    assert got[1].tolist() == [20] * 3  # 4 * 14 = 56 for 3 layers, each capped at 20 - 6: the whole prompt
    assert cascade_budgets(prefs[:1], torch.tensor([200]), torch.tensor([5]), 4, 6).tolist() == [[5, 5, 5]]  # b <= w


def loop_preference_and_indicator(probs, prefix, tau1, tau2, gamma, k):
    """Entropy, variance, P and the pooled indicator with Python loops; probs (H, w, T), prefix (H_kv, T) bool."""
    H, w, T = probs.shape
    G = H // prefix.shape[0]
    disp = var = 0.0
    ind = torch.zeros(prefix.shape)
    for h in range(H):
        pre = prefix[h // G]
        raw = []
        for j in range(T):
            col = [float(probs[h, i, j]) for i in range(w)]
            mean = sum(col) / w
            v = sum((c - mean) ** 2 for c in col) / (w - 1)
            if pre[j]:
                disp -= sum(c * math.log(c + 1e-10) for c in col)
                var += v
            raw.append(mean + gamma * v if pre[j] else 0.0)
        for j in range(T):
            if pre[j]:
                ind[h // G, j] += sum(raw[t] for t in range(j - k // 2, j + k // 2 + 1) if 0 <= t < T) / k / G
    return disp ** (1 / tau1) * var ** (1 / tau2), ind


def test_preference_and_indicator_equal_their_equations_written_with_loops():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 4, 5, 19, generator=g) * 2, -1)
    prefix = torch.zeros(2, 2, 19, dtype=torch.bool)
    prefix[:, :, :14] = True
    prefix[1, :, :3] = False  # left padding of row 1
    pref = cake_preference(probs, prefix, 1.6, 0.4)
    ind = cake_indicator(probs, prefix, gamma=200.0, kernel_size=5)
    for b in range(2):
        p_ref, i_ref = loop_preference_and_indicator(probs[b], prefix[b], 1.6, 0.4, 200.0, 5)
        assert abs(float(pref[b]) / p_ref - 1) < 1e-9
        assert torch.allclose(ind[b], i_ref, atol=1e-5)


def window_probs(q, k, scaling, w):
    """(H, w, T) attention of the last w queries over the causal prefix, by the plain per-head softmax."""
    T = k.shape[1]
    rows = [naive_probs(q[:, T - w + i], k, (torch.arange(T) <= T - w + i).expand(k.shape[0], T), scaling)
            for i in range(w)]
    return torch.stack(rows, 1)


def cascade_reference(log, L, T, b, w, gamma, cascading):
    """Every layer's kept positions: P and I by loops, stage budgets by `ref_split`, each layer cut to the smallest
    budget its stages gave it (nested top-k by its fixed indicator), the window above every prefix key."""
    prefs, inds = [], []
    for layer in range(L):
        e = log[layer][0]
        probs = window_probs(e["q"][0], e["k"][0], e["scaling"], w)
        prefix = torch.zeros(e["k"].shape[1], T, dtype=torch.bool)
        prefix[:, :T - w] = True
        p, ind = loop_preference_and_indicator(probs, prefix, 1.0, 1.0, gamma, 5)
        prefs.append(p)
        inds.append(ind)
    final = [T] * L
    for stage in range(L):
        if not cascading and stage < L - 1:
            continue
        shares = ref_split(prefs[:stage + 1], L * (b - w), T - w)
        final = [min(final[i], w + shares[i]) if i <= stage else final[i] for i in range(L)]
    kept = []
    for layer in range(L):
        top = [sorted(h[:T - w].topk(final[layer] - w).indices.tolist()) + list(range(T - w, T)) for h in inds[layer]]
        kept.append(top)
    return kept, final


@torch.no_grad()
@pytest.mark.parametrize("cascading", [True, False])
def test_every_layer_keeps_its_cascaded_share_of_the_best_tokens_by_the_indicator(cascading):
    model, T, b, w, L = tiny_llama(num_layers=4), 60, 15, 5, 4
    cache = KVCache(model, CAKE(budget=b, window=w, cascading=cascading))
    log = spy(cache)
    model(ids(T, seed=2), cache=cache)
    ref, final = cascade_reference(log, L, T, b, w, 200.0, cascading)
    assert sum(final) == L * b and len(set(final)) > 1  # the model's total, split unevenly
    for layer in range(L):
        kept = cache.layers[layer].store.kept_slots()[0].tolist()
        assert [sorted(h) for h in kept] == ref[layer], layer
    assert all(layer.store.history is None for layer in cache.layers)  # the indicators are dropped after the cascade


@torch.no_grad()
def test_the_cascade_never_holds_more_than_the_whole_budget_while_prefilling():
    """After each layer's stage the layers prefilled so far hold at most L b tokens per head (the paper's point);
    without the cascade they hold every token until the last layer."""
    model, T, b, L = tiny_llama(num_layers=4), 80, 12, 4
    peaks = {}
    for cascading in (True, False):
        cache = KVCache(model, CAKE(budget=b, window=4, cascading=cascading))
        held = []
        for i, layer in enumerate(cache.layers):
            orig = layer.store.after_attention

            def wrapped(step, orig=orig, i=i):
                orig(step)
                held.append(sum(cache.layers[j].store.kept_slots().shape[-1] if cache.layers[j].store.kept_slots()
                                is not None else T for j in range(i + 1)))
            layer.store.after_attention = wrapped
        model(ids(T), cache=cache)
        peaks[cascading] = max(held)
    assert peaks[True] <= L * b < peaks[False]


@torch.no_grad()
def test_under_another_layer_policy_the_indicator_ranks_tokens_within_its_budgets():
    model, T = tiny_llama(num_layers=4), 80
    cache = KVCache(model, CAKE(ratio=4, window=4, layers=Pyramid(beta=4)))
    log = spy(cache)
    model(ids(T), cache=cache)
    expect = pyramid_budgets(torch.tensor([T]), torch.tensor([20]), 4, 4, 4)[0].tolist()
    for i, (layer, b) in enumerate(zip(cache.layers, expect)):
        e = log[i][0]
        prefix = torch.zeros(2, T, dtype=torch.bool)
        prefix[:, :T - 4] = True
        _, ind = loop_preference_and_indicator(window_probs(e["q"][0], e["k"][0], e["scaling"], 4), prefix, 1, 1, 200.0, 5)
        ref = [sorted(h[:T - 4].topk(b - 4).indices.tolist()) + list(range(T - 4, T)) for h in ind]
        assert layer.store.kept_slots()[0].tolist() == ref and layer.store.preference is None


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, CAKE(budget=43, window=8), same_bytes=True)


@torch.no_grad()
def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    """Each generated token equals a plain forward where every layer and head sees what it held at the end of the
    prefill (earlier layers shrink after their own step, so the shared spy-based check does not apply), plus the
    generated tokens; the store holds exactly those."""
    model, T = tiny_llama(num_layers=3), 40
    cache = KVCache(model, CAKE(budget=14, window=4))
    x = ids(T, seed=4)
    logits = model(x, cache=cache).logits[:, -1]
    kept = [layer.store.kept_slots()[0].tolist() for layer in cache.layers]
    assert len({len(k[0]) for k in kept}) > 1  # layers keep different numbers
    seq = x
    for s in range(5):
        tok = logits.argmax(-1, keepdim=True)
        seq, n = torch.cat([seq, tok], 1), T + s + 1
        masks = {}
        for layer, held in enumerate(kept):
            m = torch.ones(1, len(held), n, n, dtype=torch.bool).tril()
            for i in range(T, n):
                for h, js in enumerate(held):
                    m[0, h, i] = False
                    m[0, h, i, js + list(range(T, i + 1))] = True
            masks[layer] = m
        ref = reference_logits(model, seq, masks)
        logits = model(tok, cache=cache).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-5), s
        for layer, held in zip(cache.layers, kept):
            assert layer.store.kept_slots()[0].tolist() == [js + list(range(T, n)) for js in held]


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, CAKE(ratio=2, window=6), steps=2)


@torch.no_grad()
def test_composed_with_a_quantizer_it_keeps_the_same_tokens_through_model_stores():
    model, x = tiny_llama(num_layers=3), ids(120, seed=1)
    alone = KVCache(model, CAKE(budget=40, window=8))
    model(x, cache=alone)
    both = KVCache(model, Compose(CAKE(budget=40, window=8), KIVI(bits=4, group_size=16, residual_length=16)))
    both.model_info.stores = [layer.store for layer in both.layers]  # what the cache hands every method (main)
    model(x, cache=both)
    for a, c in zip(alone.layers, both.layers):
        assert torch.equal(a.store.kept_slots(), c.store.kept_slots())
    assert both.nbytes() < alone.nbytes() / 2
    lost = KVCache(model, Compose(CAKE(budget=40, window=8), KIVI(bits=4, group_size=16, residual_length=16)))
    lost.model_info.stores = []  # a cache that does not hand its stores: CAKE cannot reach the quantizer's data
    with pytest.raises(ValueError, match="Model.stores"):
        model(x, cache=lost)


def test_made_from_its_id_and_a_ratio():
    m = make_method("cake:tau1=1.6,tau2=0.4", 4)
    assert isinstance(m, CAKE) and m.ratio == 4 and (m.window, m.gamma, m.tau1, m.tau2) == (32, 200.0, 1.6, 0.4)


def test_bad_parameters_are_rejected():
    for knob, value in (("window", 0), ("gamma", -1.0), ("tau1", 0), ("tau2", -2.0), ("kernel_size", 4),
                        ("cascading", "yes")):
        with pytest.raises(ValueError, match=knob):
            CAKE(**{knob: value})
    with pytest.raises(ValueError, match="layers must be one of cascade, uniform, pyramid"):
        CAKE(layers="adaptive")
    with pytest.raises(ValueError, match="ratio"):
        CAKE.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    achieved_ratio_is_on_target(*smollm, CAKE)
