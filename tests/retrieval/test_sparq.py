"""SparQ Attention (arXiv 2312.04985): approximate scores, the keys read, Algorithm 1's output (in the reference
function and in the model, mean-value term included) and the bytes read, against plain formulas."""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.retrieval.sparq import SparQ, sparq_approx, sparq_attention

from retrieval_checks import (budget_covering_length_is_full, decode_reads_exactly_the_selection, ids, kv_bytes_of,
                              left_padded_batch_equals_batch_one, read_shrinks_with_the_budget, spy_select)


def plain_approx(q, k, r):
    """Step 1 with loops for one row: q (H, D), k (H_kv, T, D) -> (H_kv, G, T) softmax(q[i1] K[:, i1] / tau)."""
    H, D = q.shape
    H_kv, T = k.shape[:2]
    G = H // H_kv
    out = torch.zeros(H_kv, G, T)
    for g in range(H_kv):
        mass = [sum(abs(float(q[g * G + j, d])) for j in range(G)) for d in range(D)]
        i1 = sorted(range(D), key=lambda d: -mass[d])[:r]  # the group's r largest |q| components
        for j in range(G):
            qh = q[g * G + j]
            tau = math.sqrt(D * sum(abs(float(qh[d])) for d in i1) / sum(abs(float(x)) for x in qh))
            logits = torch.tensor([sum(float(qh[d] * k[g, t, d]) for d in i1) / tau for t in range(T)])
            out[g, j] = torch.softmax(logits, 0)
    return out


def brute_force_keys(s_hat, k_read, local):
    """The local newest keys, then the best of the group-summed approximate attention, k_read in all; (H_kv, T)."""
    H_kv, _, T = s_hat.shape
    sel = torch.zeros(H_kv, T, dtype=torch.bool)
    for g in range(H_kv):
        score = s_hat[g].sum(0)
        rest = [t for t in sorted(range(T), key=lambda t: -float(score[t])) if t < T - local]
        for t in list(range(T - local, T)) + rest[: k_read - local]:
            sel[g, t] = True
    return sel


def test_approximate_scores_equal_the_plain_formula_with_the_temperature_correction():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 12, generator=g), torch.randn(2, 2, 19, 12, generator=g)
    s_hat, k_hat = sparq_approx(q, k, 5, 12 ** -0.5)
    for b in range(2):
        assert torch.allclose(s_hat[b], plain_approx(q[b], k[b], 5), atol=1e-5)
    assert k_hat.shape == (2, 2, 19, 5)  # only r channels of each key are read
    exact = torch.softmax(torch.einsum("bghd,bgtd->bght", q.view(2, 2, 2, 12), k) / 12 ** 0.5, -1)
    assert torch.allclose(sparq_approx(q, k, 12, 12 ** -0.5)[0], exact, atol=1e-5)  # r = d: exact attention


def test_algorithm_1_output_with_and_without_the_mean_value_reallocation():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 8, generator=g)
    k, v = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    s = 8 ** -0.5
    s_hat = plain_approx(q[0], k[0], 3)
    sel = brute_force_keys(s_hat, 10, 2)
    for realloc in (True, False):
        ours = sparq_attention(q, k, v, rank=3, k_read=10, local=2, scaling=s, reallocate=realloc)[0]
        for h in range(4):
            gkv = h // 2
            w = torch.softmax((k[0, gkv, sel[gkv]] @ q[0, h]) * s, 0)
            y = w @ v[0, gkv, sel[gkv]]
            if realloc:  # alpha: the approximate attention mass of the keys read
                alpha = float(s_hat[gkv, h % 2][sel[gkv]].sum())
                y = alpha * y + (1 - alpha) * v[0, gkv].mean(0)
            assert torch.allclose(ours[h], y, atol=1e-5), (realloc, h)
    full = torch.softmax(torch.einsum("ghd,gtd->ght", q.view(2, 2, 8), k[0]) * s, -1) @ v[0]
    ours = sparq_attention(q, k, v, rank=8, k_read=30, local=1, scaling=s)[0]
    assert torch.allclose(ours, full.reshape(4, 8), atol=1e-5)


@pytest.mark.parametrize("reallocate", [True, False])
@torch.no_grad()
def test_the_store_reads_the_brute_force_top_k_and_reports_those_bytes(tiny, reallocate):
    cache = KVCache(tiny, SparQ(budget=12, rank=4, local_share=0.25, reallocate=reallocate))
    log = spy_select(cache)
    tiny(ids(37, seed=1), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    for layer in range(2):
        for e in log[layer][1:]:
            T = e["k"].shape[2]
            s_hat = plain_approx(e["q"][0, :, -1], e["k"][0], 4)
            sel = brute_force_keys(s_hat, 12, 3)  # local window round(0.25 x 12) = 3, the current key included
            assert torch.equal(e["sel"][0, :, 0], sel), (layer, T)
            mean = 2 * (16 + 1) * 4 if reallocate else 0  # the running mean: H_kv x (D sums + 1 count) x fp32
            assert e["read"] == kv_bytes_of(sel, e["k"], e["v"]) + 2 * T * 4 * 4 + mean  # + H_kv x T x r x fp32


def spy_mix(cache):
    """Record, per layer, every mix call's (step, attention output given, output returned)."""
    log = {i: [] for i in range(len(cache.layers))}
    for i, layer in enumerate(cache.layers):
        def wrapped(step, out, i=i, orig=layer.store.mix):
            mixed = orig(step, out)
            log[i].append(dict(q=step.queries.clone(), k=step.keys.clone(), v=step.values.clone(),
                               scaling=step.scaling, out=out.clone(), mixed=mixed.clone()))
            return mixed
        layer.store.mix = wrapped
    return log


@torch.no_grad()
def test_the_model_runs_algorithm_1_with_the_mean_value_term(tiny):
    """Each decoding step of each layer, against Algorithm 1 as plain formulas: attention reads the brute-force
    top-k, then y = alpha y_k + (1 - alpha) mean(V), alpha the approximate mass of the keys read."""
    cache = KVCache(tiny, SparQ(budget=12, rank=4))
    log = spy_mix(cache)
    logits = [tiny(ids(37, seed=1), cache=cache).logits[:, -1]]
    for t in range(3):
        logits.append(tiny(torch.tensor([[5 + t]]), cache=cache).logits[:, -1])
    for layer in range(2):
        assert torch.equal(log[layer][0]["mixed"], log[layer][0]["out"])  # the prompt read every key: unchanged
        for e in log[layer][1:]:
            q, k, v, s = e["q"][0, :, -1], e["k"][0], e["v"][0], e["scaling"]
            s_hat = plain_approx(q, k, 4)
            sel = brute_force_keys(s_hat, 12, 3)
            for h in range(4):
                g = h // 2
                y = torch.softmax(k[g, sel[g]] @ q[h] * s, 0) @ v[g, sel[g]]
                alpha = float(s_hat[g, h % 2][sel[g]].sum())
                assert 0 < alpha < 1
                assert torch.allclose(e["out"][0, h, 0], y, atol=1e-5)  # attention read exactly the top-k
                assert torch.allclose(e["mixed"][0, h, 0], alpha * y + (1 - alpha) * v[g].mean(0), atol=1e-5)
    plain = KVCache(tiny, SparQ(budget=12, rank=4, reallocate=False))
    other = [tiny(ids(37, seed=1), cache=plain).logits[:, -1]]
    for t in range(3):
        other.append(tiny(torch.tensor([[5 + t]]), cache=plain).logits[:, -1])
    assert torch.equal(logits[0], other[0]) and not torch.allclose(logits[1], other[1], atol=1e-4)


def test_decoding_reads_exactly_the_selected_keys(tiny):
    decode_reads_exactly_the_selection(tiny, SparQ(budget=10, rank=4, reallocate=False))


def test_a_budget_covering_every_key_is_the_full_cache(tiny):
    budget_covering_length_is_full(tiny, SparQ(budget=44, rank=2))


def test_left_padded_batch_equals_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, SparQ(budget=12, rank=4))


def test_bytes_read_shrink_with_the_budget(tiny):
    read_shrinks_with_the_budget(tiny, lambda r: SparQ(ratio=r))


def test_from_ratio_and_presets():
    m = SparQ.from_ratio(8)
    assert (m.ratio, m.rank, m.local_share, m.reallocate) == (8, None, 0.25, True)
    assert SparQ().read_budget(torch.tensor([4000])).item() == 128  # the paper's k = 128
    assert SparQ.from_ratio(8, budget=32).ratio is None


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        SparQ(rank=0)
    with pytest.raises(ValueError, match=r"local_share must be a number in \[0, 1\]"):
        SparQ(local_share=1.5)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        SparQ(ratio=0.9)
    with pytest.raises(ValueError, match="reallocate must be a bool"):
        SparQ(reallocate=1)
