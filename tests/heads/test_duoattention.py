"""DuoAttention (arXiv 2410.10819): the local distillation Gram matrix, the gate optimisation, the budget split and
the retrieval / streaming caches, against loops, the lasso's closed form and plain masked forwards."""

import pytest
import torch

from reference_impls import KVCache, make_method
from reference_impls.base import Model
from reference_impls.generation import greedy_generate
from reference_impls.heads.duoattention import DuoAttention, duo_gates, duo_gram, duo_split
from reference_impls.integration import model_info
from reference_impls.models import tiny_llama

from evict_checks import budget_at_least_length_is_full, generation_equals_attention_over_held, ids


def test_gram_equals_a_loop_over_queries_and_heads():
    """d_g(t) = sum over g's query heads of W_o,h (full - streaming attention output of query t), by plain softmax
    over the keys each may see; M = mean over t and channels of d_g . d_g'."""
    g = torch.Generator().manual_seed(0)
    H, H_kv, T, D, d_model, sink, recent, label = 4, 2, 20, 8, 12, 2, 5, 6
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (H, H_kv, H_kv))
    w_o = torch.randn(d_model, H * D, generator=g)
    ref = torch.zeros(H_kv, H_kv)
    d = torch.zeros(H_kv, label, d_model)
    for t_i, t in enumerate(range(T - label, T)):
        for h in range(H):
            logits = torch.stack([q[0, h, t] @ k[0, h // 2, j] * 0.3 for j in range(t + 1)])
            full = torch.softmax(logits, 0) @ v[0, h // 2, : t + 1]
            seen = [j for j in range(t + 1) if j < sink or j > t - recent]
            stream = torch.softmax(logits[seen], 0) @ v[0, h // 2, seen]
            d[h // 2, t_i] += w_o[:, h * D:(h + 1) * D] @ (full - stream)
    for a in range(H_kv):
        for b in range(H_kv):
            ref[a, b] = sum(float(d[a, t] @ d[b, t]) for t in range(label)) / (label * d_model)
    got = duo_gram(q, k, v, w_o, 0.3, n_sink=sink, recent=recent, label=label)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_gates_reach_the_closed_form_of_the_one_head_lasso():
    """Diagonal M: each gate minimises m (1 - a)^2 / Z + reg a / N, so a* = clamp(1 - reg Z / (2 N m), 0, 1)."""
    m = torch.tensor([[4.0, 1.0], [0.2, 0.02]])
    reg, Z, N = 0.3, float(m.sum()), 4
    gates = duo_gates(torch.diag_embed(m), reg=reg, lr=0.02, steps=2000)
    expect = (1 - reg * Z / (2 * N * m)).clamp(0, 1)
    assert torch.allclose(gates, expect, atol=0.01), (gates, expect)
    assert gates[1, 1] == 0 and gates[0, 0] > gates[0, 1] > gates[1, 0]


@pytest.mark.parametrize("n,b", [(200, 100), (200, 50), (200, 20), (200, 5), (50, 60), (100, 69)])
def test_split_keeps_the_most_heads_whole_that_the_budget_allows(n, b):
    """Brute force over k: the largest k with k n + (total - k)(sink + recent) <= total b; the rest share what is
    left."""
    total, sink, recent = 6, 4, 16
    k, window = duo_split(torch.tensor([n]), torch.tensor([b]), total, sink, recent)
    b = min(b, n)
    best = max([j for j in range(total + 1) if j * n + (total - j) * min(n, sink + recent) <= total * b], default=0)
    assert int(k) == best
    if best < total:
        assert int(window) == max((total * b - best * n) // (total - best) - sink, 0)
        assert best * n + (total - best) * (sink + int(window)) <= total * b or int(window) == 0


def duo(**kw):
    return DuoAttention(**{**dict(steps=200, calib_tokens=64, label_tokens=8, recent=8, n_sink=2), **kw})


def ranks(model, method):
    gates, own = method.gates(model_info(model))
    order = sorted(range(gates.numel()), key=lambda i: (-float(gates.flatten()[i]), -float(own.flatten()[i])))
    return {head: r for r, head in enumerate(order)}  # flat (layer * H_kv + head) -> rank, 0 = most retrieving


@torch.no_grad()
def test_top_ranked_heads_keep_everything_and_streaming_heads_roll_their_window():
    model, T, steps = tiny_llama(), 40, 5
    method = duo(retrieval=0.5)
    rank = ranks(model, method)
    cache, log = generation_equals_attention_over_held(model, method, T=T, steps=steps)
    for l, entries in log.items():
        for s, e in enumerate(entries):  # after the prefill (s = 0) and after each generated token
            n = T + s
            for h in range(2):
                held = sorted(j for j in e["kept"][0, h].tolist() if j >= 0)
                whole = rank[l * 2 + h] < 2  # retrieval = 0.5 of 4 KV heads
                assert held == (list(range(n)) if whole else [0, 1] + list(range(n - 8, n))), (l, h, s)


@torch.no_grad()
def test_the_ratio_sets_how_many_heads_retrieve_and_the_cache_holds_the_budget():
    model, T = tiny_llama(), 120
    for ratio in (1.5, 3, 10):
        cache = KVCache(model, duo(ratio=ratio))
        model(ids(T, seed=1), cache=cache)
        b = round(T / ratio)
        k, window = duo_split(torch.tensor([T]), torch.tensor([b]), 4, 2, 8)
        held = [int((layer.store.kept_slots()[0, h] >= 0).sum()) for layer in cache.layers for h in range(2)]
        assert sorted(held, reverse=True) == [T] * int(k) + [2 + int(window)] * (4 - int(k)), (ratio, held)
        assert 4 * b - 4 <= sum(held) <= 4 * b, ratio  # the budget, up to the streaming heads' rounding


@torch.no_grad()
def test_every_head_retrieving_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, duo(retrieval=1.0), same_bytes=True)


@torch.no_grad()
def test_gates_on_the_tiny_model_are_fitted_from_the_recorded_prefill():
    """The gates make_method fits are duo_gates of the Gram matrices of the calibration record's layers."""
    model = tiny_llama()
    info = model_info(model)
    method = duo()
    steps = info.calibration("passkey", 64)
    gram = torch.stack([duo_gram(s.queries, s.keys, s.values, info.weights(i)["o"], s.scaling, n_sink=2, recent=8,
                                 label=8) for i, s in enumerate(steps)])
    gates, own = method.gates(info)
    assert torch.equal(gates, duo_gates(gram, steps=200)) and torch.equal(own, torch.diagonal(gram, dim1=1, dim2=2))
    gen = greedy_generate(model, KVCache(model, make_method("duoattention", 4)), [ids(150)], 4)
    assert len(gen.tokens) == 4 and gen.kv_bytes < 2 * gen.full_kv_bytes  # fp32 held, 16-bit full


def test_bad_parameters_are_rejected():
    for kw, name in ((dict(retrieval=1.5), "retrieval"), (dict(n_sink=-1), "n_sink"), (dict(recent=0), "recent"),
                     (dict(calib_tokens=8), "calib_tokens"), (dict(label_tokens=0), "label_tokens"),
                     (dict(reg=-1), "reg"), (dict(lr=0), "lr"), (dict(steps=0), "steps"), (dict(ratio=0.9), "ratio")):
        with pytest.raises(ValueError, match=name):
            DuoAttention(**kw)
    with pytest.raises(ValueError, match="weights"):
        DuoAttention().new_layer(0, Model(num_layers=1))
