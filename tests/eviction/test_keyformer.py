"""Keyformer (arXiv 2403.09054): Gumbel-regularised accumulated score + recent window, against plain loops.

GQA: every query head draws its own Gumbel noise; the regularised scores of the G query heads of a group are
averaged per KV head (as our H2O does), then summed over queries and steps.
"""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.base import Step
from reference_impls.eviction.h2o import H2O
from reference_impls.eviction.keyformer import Keyformer, gumbel_noise, keyformer_scores
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, memory_stays_at_budget, spy)


def draw(seed, layer, n, shape):
    """The documented noise: U from torch.rand on a generator seeded by (seed, layer, tokens seen); -log(-log U)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + layer) * 1_000_003 + n) % 2**63)
    return -torch.log(-torch.log(torch.rand(*shape, generator=g)))


def loop_f(q, k, scaling, allowed, zeta, tau):
    """f(x_i) = exp((x_i + zeta_i) / tau) / sum_j exp((x_j + zeta_j) / tau) over the allowed keys, one query head."""
    w = torch.tensor([math.exp(((q @ k[j]).item() * scaling + zeta[j].item()) / tau) if allowed[j] else 0.0
                      for j in range(k.shape[0])], dtype=torch.float64)
    return w / w.sum()


def test_scores_equal_the_equation_with_the_same_noise():
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, q, T, D = 2, 4, 2, 3, 7, 8
    Q, K = torch.randn(B, H, q, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    mask = torch.rand(B, H_kv, q, T, generator=g) > 0.3
    mask[..., 0] = True
    noise = torch.randn(B, H, q, T, generator=g)
    ours = keyformer_scores(Q, K, 0.3, mask, tau=1.7, noise=noise)
    for b in range(B):
        for h in range(H):
            for i in range(q):
                ref = loop_f(Q[b, h, i], K[b, h // 2], 0.3, mask[b, h // 2, i], noise[b, h, i], 1.7)
                assert torch.allclose(ours[b, h, i].double(), ref, atol=1e-6), (b, h, i)


def test_noise_is_gumbel_from_the_documented_generator():
    valid = torch.ones(1, 2, 9, dtype=torch.bool)
    ours = gumbel_noise(valid, torch.ones(1, 3, dtype=torch.bool), 4, torch.tensor([9]), seed=5, layer_idx=2)
    assert torch.equal(ours, draw(5, 2, 9, (4, 3, 9))[None])
    # holes and a padding query: the j-th real query and t-th valid key of each head get U[:, j, t]
    valid = torch.tensor([[[1, 0, 1, 1, 0], [0, 1, 1, 1, 1]]], dtype=torch.bool)
    q_real = torch.tensor([[False, True, True]])
    ours = gumbel_noise(valid, q_real, 4, torch.tensor([11]), seed=5, layer_idx=2)
    ref, z = torch.zeros(1, 4, 3, 5), draw(5, 2, 11, (4, 2, 4))
    for h in range(4):
        cols = valid[0, h // 2].nonzero().flatten().tolist()
        for j, i in enumerate([1, 2]):
            for t, c in enumerate(cols):
                ref[0, h, i, c] = z[h, j, t]
    keep = valid.repeat_interleave(2, 1)[:, :, None, :].expand(-1, -1, 3, -1)
    assert torch.equal(ours[keep], ref[keep]) and (ours[:, :, 0] == 0).all()
    big = gumbel_noise(torch.ones(1, 1, 1000, dtype=torch.bool), torch.ones(1, 100, dtype=torch.bool), 1,
                       torch.tensor([7]), seed=0, layer_idx=0)
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.var().item() - math.pi ** 2 / 6) < 0.05  # Gumbel(0, 1)


def test_gqa_averages_the_group_and_each_query_head_has_its_own_noise():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    q[:, 1] = q[:, 0]  # two query heads of group 0 ask the same thing
    step = Step.dense(q, k, k, scaling=0.25, layer_idx=3)
    acc = Keyformer(seed=7).observe(step, None)
    zeta = draw(7, 3, 5, (4, 5, 5))
    ref = torch.zeros(2, 5, dtype=torch.float64)
    per_head = []
    for h in range(4):
        f = sum(loop_f(q[0, h, i], k[0, h // 2], 0.25, [j <= i for j in range(5)], zeta[h, i], 1.0) for i in range(5))
        per_head.append(f)
        ref[h // 2] += f / 2  # mean over the 2 query heads of the group
    assert torch.allclose(acc[0].double(), ref, atol=1e-5)
    assert not torch.allclose(per_head[0], per_head[1], atol=1e-3)  # same queries, different noise


@torch.no_grad()
def test_without_noise_and_at_tau_1_it_is_h2o(tiny):
    """gumbel=False, tau = 1: the accumulated score is H2O's accumulated attention; with matching windows
    (floor(0.3 * 10) = 10 - round(0.7 * 10) = 3) the kept sets and the stored scores are the same."""
    caches = [KVCache(tiny, Keyformer(budget=10, gumbel=False, tau_init=1, tau_end=1)),
              KVCache(tiny, H2O(budget=10, heavy_fraction=0.7))]
    for c in caches:
        tiny(ids(30, seed=8), cache=c)
        for t in range(4):
            tiny(torch.tensor([[30 + t]]), cache=c)
    for a, b in zip(*(c.layers for c in caches)):
        assert torch.equal(a.store.kept_slots(), b.store.kept_slots())
        assert torch.equal(a.store.history, b.store.history)


@torch.no_grad()
@pytest.mark.parametrize("budget,recent_fraction,seed", [(12, 0.3, 0), (9, 0.5, 3), (10, 0.0, 1)])
def test_kept_sets_equal_a_replay_with_noise_and_the_temperature_schedule(budget, recent_fraction, seed):
    """Replay from what each step saw: per KV head a dict slot -> accumulated sum over queries and steps of the
    group-mean of f with this step's noise and tau_t = 1 + min(t, 3) / 3 (t = steps since the prefill); over
    budget keep the last floor(r * b) positions and the best-scored rest."""
    model, T, steps = tiny_llama(), 24, 5
    method = Keyformer(budget=budget, recent_fraction=recent_fraction, seed=seed, tau_init=1, tau_end=2, tau_steps=3)
    cache = KVCache(model, method)
    log = spy(cache)
    model(ids(T, seed=3), cache=cache)
    for t in range(steps):
        model(torch.tensor([[20 + t]]), cache=cache)
    n_recent = math.floor(budget * recent_fraction + 1e-9)
    for layer, entries in log.items():
        H, H_kv = entries[0]["q"].shape[1], entries[0]["k"].shape[1]
        G = H // H_kv
        accs, helds = [{} for _ in range(H_kv)], [[] for _ in range(H_kv)]
        for t, e in enumerate(entries):
            slots, q_len = e["slots"][0, 0].tolist(), e["q"].shape[2]
            tau = 1 + min(t, 3) / 3
            zeta = draw(seed, layer, max(slots) + 1, (H, q_len, len(slots)))
            for h in range(H_kv):
                acc, held = accs[h], helds[h]
                slots = e["slots"][0, h].tolist()
                held += [s for s in slots if s not in held]
                for i in range(q_len):
                    qpos = slots[-q_len + i]
                    allowed = [0 <= s <= qpos for s in slots]
                    for hq in range(h * G, (h + 1) * G):
                        f = loop_f(e["q"][0, hq, i], e["k"][0, h], e["scaling"], allowed, zeta[hq, i], tau)
                        for j, s in enumerate(slots):
                            acc[s] = acc.get(s, 0.0) + f[j].item() / G
                if len(held) > budget:
                    n = max(held) + 1
                    recent = [s for s in held if s >= n - n_recent]
                    rest = sorted((s for s in held if s not in recent), key=lambda s: -acc[s])
                    helds[h] = held = sorted(recent + rest[:budget - n_recent])
                assert sorted(s for s in e["kept"][0, h].tolist() if s >= 0) == held, (layer, t, h)
        store = cache.layers[layer].store  # the stored scores of the held tokens are the replay's sums
        for h in range(H_kv):
            got = dict(zip(store.kept_slots()[0, h].tolist(), store.history[0, h].tolist()))
            assert all(abs(got[s] - accs[h][s]) < 1e-4 for s in helds[h]), (layer, h)


@torch.no_grad()
def test_the_seed_reproduces_the_kept_tokens_and_the_noise_changes_them(tiny):
    def kept(method):
        c = KVCache(tiny, method)
        tiny(ids(60, seed=9), cache=c)
        for t in range(3):
            tiny(torch.tensor([[40 + t]]), cache=c)
        return [layer.store.kept_slots() for layer in c.layers]

    method = Keyformer(budget=12)
    a, b = kept(method), kept(method)  # the same object reused: the step counter restarts with the new cache
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, kept(Keyformer(budget=12, seed=1))))
    assert not all(torch.equal(x, y) for x, y in zip(a, kept(Keyformer(budget=12, gumbel=False))))


def test_temperature_grows_linearly_then_stays():
    m = Keyformer(tau_init=1.0, tau_end=2.0, tau_steps=4)
    assert [m.tau(t) for t in (0, 1, 2, 4, 9)] == [1.0, 1.25, 1.5, 2.0, 2.0]


def test_every_layer_and_head_keeps_the_budget_and_the_recent_window(tiny):
    cache = kept_counts_equal_budget(tiny, Keyformer(budget=14), budget=14)
    for layer in cache.layers:
        for h in range(2):
            assert set(range(46, 50)) <= set(layer.store.kept_slots()[0, h].tolist())  # floor(0.3 * 14) = 4 recent


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, Keyformer(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, Keyformer(ratio=2), steps=4)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, Keyformer(budget=12))


def test_memory_stays_at_the_budget_while_decoding(tiny):
    memory_stays_at_budget(tiny, Keyformer(budget=16))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="recent_fraction"):
        Keyformer(recent_fraction=1.5)
    with pytest.raises(ValueError, match="tau_init"):
        Keyformer(tau_init=0)
    with pytest.raises(ValueError, match="tau_end"):
        Keyformer(tau_end=-1.0)
    with pytest.raises(ValueError, match="tau_steps"):
        Keyformer(tau_steps=0)
    with pytest.raises(ValueError, match="gumbel"):
        Keyformer(gumbel="yes")
    with pytest.raises(ValueError, match="seed"):
        Keyformer(seed=-1)
    with pytest.raises(ValueError, match="budget"):
        Keyformer(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        Keyformer.from_ratio(0.5)
