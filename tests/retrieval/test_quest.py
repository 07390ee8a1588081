"""Quest (arXiv 2406.10774): page bounds, their criticality, the pages read and the bytes read, against plain loops."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.generation import greedy_generate
from reference_impls.retrieval.quest import Quest, quest_page_scores

from retrieval_checks import (budget_covering_length_is_full, decode_reads_exactly_the_selection, ids, kv_bytes_of,
                              left_padded_batch_equals_batch_one, read_shrinks_with_the_budget, spy_select)


def loop_bounds(k, S):
    """Per page of S consecutive keys, the element-wise min and max, by looping: k (H_kv, T, D) -> 2 x (H_kv, P, D)."""
    H_kv, T, D = k.shape
    P = (T + S - 1) // S
    lo, hi = torch.empty(H_kv, P, D), torch.empty(H_kv, P, D)
    for h in range(H_kv):
        for p in range(P):
            for d in range(D):
                col = [float(k[h, t, d]) for t in range(p * S, min((p + 1) * S, T))]
                lo[h, p, d], hi[h, p, d] = min(col), max(col)
    return lo, hi


def loop_criticality(q, lo, hi):
    """Algorithm 1 with loops, q (H, D): per KV head and page, max over its query heads of sum_d max(q m, q M)."""
    H, D = q.shape
    H_kv, P = lo.shape[:2]
    out = torch.full((H_kv, P), float("-inf"))
    for h in range(H):
        g = h // (H // H_kv)
        for p in range(P):
            u = sum(max(float(q[h, d] * lo[g, p, d]), float(q[h, d] * hi[g, p, d])) for d in range(D))
            out[g, p] = max(float(out[g, p]), u)
    return out


def test_criticality_equals_the_loop_and_bounds_every_key_of_the_page():
    g = torch.Generator().manual_seed(0)
    q, k, S = torch.randn(4, 8, generator=g), torch.randn(2, 37, 8, generator=g), 5
    lo, hi = loop_bounds(k, S)
    ours = quest_page_scores(q[None], lo[None], hi[None])[0]
    assert torch.allclose(ours, loop_criticality(q, lo, hi), atol=1e-5)
    for h in range(4):  # an upper bound of the largest q.k of every head of the group, on every page
        for p in range(lo.shape[1]):
            true_max = (k[h // 2, p * S:(p + 1) * S] @ q[h]).max()
            assert ours[h // 2, p] >= true_max - 1e-5
    # and not a trivial one: the bound of a one-key page is that key's score (max over the group)
    single = quest_page_scores(q[None], k[None, :, :1], k[None, :, :1])[0, :, 0]
    assert torch.allclose(single, torch.stack([(k[0, 0] @ q[:2].T).max(), (k[1, 0] @ q[2:].T).max()]), atol=1e-5)


@torch.no_grad()
def test_held_bounds_and_selected_pages_equal_a_brute_force_top_k_of_the_loop_bound(tiny):
    S, budget = 4, 16  # K = 4 pages read, the current one included
    cache = KVCache(tiny, Quest(budget=budget, page_size=S, dense_layers=0))
    log = spy_select(cache)
    tiny(ids(37, seed=1), cache=cache)
    for t in range(4):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    for layer in range(2):
        store = cache.layers[layer].store
        lo, hi = loop_bounds(store.k[0], S)  # bounds built step by step equal bounds of the held keys
        assert torch.equal(store.kmin[0], lo) and torch.equal(store.kmax[0], hi)
        for e in log[layer][1:]:
            T = e["k"].shape[2]
            lo, hi = loop_bounds(e["k"][0], S)
            U = loop_criticality(e["q"][0, :, -1], lo, hi)  # (H_kv, P)
            cur = (T - 1) // S
            for h in range(2):
                others = [p for p in sorted(range(U.shape[1]), key=lambda p: -float(U[h, p])) if p != cur]
                pages = {cur, *others[: budget // S - 1]}
                expect = torch.tensor([t // S in pages for t in range(T)])
                assert torch.equal(e["sel"][0, h, 0], expect), (layer, T, h)
            # bytes read: the selected keys and values, gathered, plus every page's min and max
            bounds = 2 * 2 * U.shape[1] * 16 * 4  # min+max x H_kv x pages x D x fp32
            assert e["read"] == kv_bytes_of(e["sel"][0, :, 0], e["k"], e["v"]) + bounds


def test_decoding_reads_exactly_the_selected_pages(tiny):
    _, log = decode_reads_exactly_the_selection(tiny, Quest(budget=12, page_size=4, dense_layers=1))
    assert all(e["sel"] is None for e in log[0])  # the dense first layer reads everything
    assert all(e["sel"][0, :, 0].sum(-1).tolist() == [12, 12] for e in log[1][1:] if e["k"].shape[2] % 4 == 0)


def test_a_budget_covering_every_page_is_the_full_cache(tiny):
    budget_covering_length_is_full(tiny, Quest(budget=48, page_size=4, dense_layers=0))


def test_left_padded_batch_gives_each_row_its_own_pages(tiny):
    left_padded_batch_equals_batch_one(tiny, Quest(budget=12, page_size=4, dense_layers=0))


def test_bytes_read_shrink_with_the_budget_while_the_whole_cache_and_its_bounds_are_held(tiny):
    read_shrinks_with_the_budget(tiny, lambda r: Quest(ratio=r, page_size=4, dense_layers=0))
    gen = greedy_generate(tiny, KVCache(tiny, Quest.from_ratio(8, page_size=4, dense_layers=1)), [ids(64)], 4)
    full = 2 * 2 * 2 * 64 * 16 * 4  # layers x K,V x H_kv x tokens x D x fp32
    assert gen.kv_bytes == full + 2 * 2 * 16 * 16 * 4  # + layer 1's min and max: H_kv x 16 pages x D x fp32
    assert gen.read_kv_bytes < gen.kv_bytes_end / 1.5


def test_from_ratio_sets_the_read_budget_and_the_paper_presets():
    q = Quest.from_ratio(4)
    assert (q.ratio, q.budget, q.page_size, q.dense_layers) == (4, None, 16, 2)
    assert Quest.from_ratio(4, budget=64).ratio is None  # a fixed budget is not overridden
    assert Quest().read_budget(torch.tensor([5000])).item() == 1024  # paper: a 1K-token budget


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        Quest(page_size=0)
    with pytest.raises(ValueError, match="dense_layers must be an int >= 0"):
        Quest(dense_layers=-1)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        Quest.from_ratio(0.5)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        Quest(budget=0)
