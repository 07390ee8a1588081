"""Scissorhands (arXiv 2305.17118): "unimportant" votes of the last w queries + recent window, against loops."""

from collections import deque
from dataclasses import dataclass

import pytest
import torch

from reference_impls import KVCache
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.eviction.base import EvictionMethod
from reference_impls.eviction.scissorhands import (Scissorhands, scissorhands_scores, unimportant_votes,
                                                   window_counts, window_update)
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, memory_stays_at_budget,
                          naive_probs, spy)


def test_votes_equal_a_loop_over_queries_keys_and_group_heads():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 4, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    allowed = torch.rand(2, 2, 4, 11, generator=g) < 0.7
    allowed[1, 0, 2] = False  # a query that saw nothing votes for nothing
    ours = unimportant_votes(q, k, allowed, 0.3)
    for b in range(2):
        for h in range(2):
            for i in range(4):
                n = int(allowed[b, h, i].sum())
                p = sum(naive_probs(q[b, :, i], k[b], allowed[b, :, i], 0.3)[h * 3 + g_] for g_ in range(3)) / 3
                ref = [bool(allowed[b, h, i, j]) and p[j].item() < 1 / max(n, 1) for j in range(11)]
                assert ours[b, h, i].tolist() == ref, (b, h, i)


def test_gqa_votes_threshold_the_mean_of_the_group_not_each_head():
    """Two query heads share one KV head. Per head they disagree; the group mean [.175, .175, .325, .325] is below
    the uniform 1/4 on keys 0 and 1 only (per-head AND would mark none, OR all four, head 0 alone keys 2 and 3)."""
    p = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.05, 0.05, 0.45, 0.45]])
    q = p.log()[None, :, None, :]  # (1, 2, 1, 4): with one-hot keys and scaling 1 the logits are log p
    k = torch.eye(4)[None, None]  # (1, 1, 4, 4)
    votes = unimportant_votes(q, k, torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0)
    assert votes[0, 0, 0].tolist() == [True, True, False, False]
    only_first = torch.tensor([True, False, False, False])[None, None, None]
    votes = unimportant_votes(q, k, only_first, 1.0)  # a query that saw one key gives it weight 1 = the average
    assert votes[0, 0, 0].tolist() == [False] * 4


@pytest.mark.parametrize("window", [1, 5, 8, 13])
def test_ring_counts_equal_a_deque_of_the_last_w_queries(window):
    """Random votes over steps that add keys and queries; a key's count is the votes of the last w queries only."""
    g = torch.Generator().manual_seed(window)
    bits, log, T, seen = None, deque(maxlen=window), 0, 0  # log: (stream index, votes (B, H, T_at_that_time))
    for q in (9, 1, 1, 3, 1, 1, 1, 1, 2, 1):
        T, seen = T + q, seen + q
        n = min(q, window)
        votes = torch.rand(2, 3, n, T, generator=g) < 0.4
        bits = window_update(bits, votes, seen - n, window)
        for i in range(n):
            log.append(votes[:, :, i])
        ref = torch.zeros(2, 3, T, dtype=torch.long)
        for v in log:
            ref[..., : v.shape[-1]] += v.long()
        assert bits.shape == (2, 3, T, (window + 7) // 8) and bits.dtype == torch.uint8
        assert torch.equal(window_counts(bits), ref)


def test_scores_rank_recent_first_then_fewest_votes_then_most_recent():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 4, (2, 2, 15), generator=g)
    positions = torch.arange(15).expand(2, 2, 15).clone()
    positions[1, :, :3] = -1  # holes
    n_real = torch.tensor([15, 15])
    s = scissorhands_scores(counts, positions, n_real, n_recent=4)
    for b in range(2):
        for h in range(2):
            real = [j for j in range(15) if positions[b, h, j] >= 0]
            # recent (positions >= 11) first, then fewest votes, then the newer token
            ref = sorted(real, key=lambda j: (j < 11, counts[b, h, j].item() if j < 11 else 0, -j))
            assert s[b, h].argsort(descending=True).tolist()[: len(real)] == ref
            assert (s[b, h, [j for j in range(15) if j not in real]] == float("-inf")).all()


@torch.no_grad()
@pytest.mark.parametrize("budget,recent,window", [(12, 3, 5), (9, 0, 30), (10, 10, 4), (8, 12, 7)])
def test_kept_sets_equal_a_replay_of_algorithm_2(budget, recent, window):
    """Replay from what each step saw: per layer and KV head, every window query marks the keys whose attention
    (mean over the group's query heads, over the keys it saw) is below 1/(keys seen); over budget, keep the r
    most recent tokens and then the fewest marks among the last w queries, ties to the newer token."""
    model, T, steps = tiny_llama(), 24, 6
    cache = KVCache(model, Scissorhands(budget=budget, recent_window=recent, history_window=window))
    log = spy(cache)
    model(ids(T, seed=3), cache=cache)
    model(torch.tensor([[7, 8, 9]]), cache=cache)  # a chunk after eviction (the question, query-agnostic setting)
    for t in range(steps):
        model(torch.tensor([[20 + t]]), cache=cache)
    for layer, entries in log.items():
        H_kv = entries[0]["k"].shape[1]
        G = entries[0]["q"].shape[1] // H_kv
        for h in range(H_kv):
            marks, held = {}, []  # marks: slot -> stream indices of the queries that found it unimportant
            for e in entries:
                slots, q_n = e["slots"][0, h].tolist(), e["q"].shape[2]
                held = held + [s for s in slots if s not in held]
                for i in range(max(0, q_n - window), q_n):
                    qpos = slots[-q_n + i]
                    allowed = torch.tensor([0 <= s <= qpos for s in slots])
                    p = naive_probs(e["q"][0, :, i], e["k"][0], allowed[None].expand(H_kv, -1), e["scaling"])
                    votes = p[h * G:(h + 1) * G].mean(0).tolist()
                    for j, s in enumerate(slots):
                        if allowed[j] and votes[j] < 1 / int(allowed.sum()):
                            marks.setdefault(s, []).append(qpos)
                n = slots[-1] + 1
                if len(held) > budget:
                    count = {s: sum(1 for qi in marks.get(s, []) if qi >= n - window) for s in held}
                    recent_set = sorted(s for s in held if s >= n - recent)[-budget:]
                    rest = sorted((s for s in held if s not in recent_set), key=lambda s: (count[s], -s))
                    held = sorted(recent_set + rest[: budget - len(recent_set)])
                assert sorted(s for s in e["kept"][0, h].tolist() if s >= 0) == held, (layer, h)


def test_every_layer_and_head_keeps_the_budget_and_the_recent_window(tiny):
    cache = kept_counts_equal_budget(tiny, Scissorhands(budget=14, recent_window=6), budget=14)
    for layer in cache.layers:
        for h in range(2):
            assert set(range(44, 50)) <= set(layer.store.kept_slots()[0, h].tolist())


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, Scissorhands(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    method = Scissorhands(ratio=2, history_window=28, recent_window=2)  # the prefill window spans row 2's padding
    left_padded_batch_equals_batch_one(tiny, method, steps=4)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, Scissorhands(budget=12, recent_window=3, history_window=6))


def test_memory_stays_at_the_budget_while_decoding(tiny):
    memory_stays_at_budget(tiny, Scissorhands(budget=12))


@torch.no_grad()
def test_cache_from_a_recorded_prefill_equals_the_live_cache(tiny):
    """The evidence run builds caches from one recorded prefill: same kept tokens and the same vote rings."""
    method, x = Scissorhands(budget=15, recent_window=3, history_window=20), ids(45, seed=7)
    live = KVCache(tiny, method)
    tiny(x, cache=live)
    replay = cache_from_record(tiny, method, record_prefill(tiny, x))
    for a, b in zip(live.layers, replay.layers):
        assert torch.equal(a.store.kept_slots(), b.store.kept_slots()) and torch.equal(a.store.history, b.store.history)
    assert live.nbytes() == replay.nbytes()


@dataclass
class _Tagged(EvictionMethod):
    """Carries a (B, H_kv, T, 3) statistic naming its key: kept from the last step, new keys tagged; random scores."""

    def observe(self, step, history):
        tags = (step.positions[..., None] * 10 + torch.arange(3)).float()
        return tags if history is None else torch.cat([history, tags[:, :, history.shape[2]:]], 2)

    def score(self, step, history, budget):
        return torch.randn(step.keys.shape[:3], generator=torch.Generator().manual_seed(int(step.n_real()[0])))


@torch.no_grad()
def test_store_gathers_a_history_with_trailing_dims_along_with_its_keys(tiny):
    """EvictingStore change made for Scissorhands: a 4-D history follows its key through the eviction and is
    handed back, aligned with the held keys, on the next steps."""
    cache = KVCache(tiny, _Tagged(budget=7))
    tiny(ids(20), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    for layer in cache.layers:
        kept, hist = layer.store.kept_slots(), layer.store.history
        assert hist.shape == (1, 2, 10, 3) and len(set(kept[0, 0].tolist())) == 10
        assert torch.equal(hist, (kept[..., None] * 10 + torch.arange(3)).float())


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="history_window"):
        Scissorhands(history_window=0)
    with pytest.raises(ValueError, match="history_window"):
        Scissorhands(history_window=2.5)
    with pytest.raises(ValueError, match="recent_window"):
        Scissorhands(recent_window=-1)
    with pytest.raises(ValueError, match="budget"):
        Scissorhands(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        Scissorhands.from_ratio(0.5)
    assert Scissorhands.from_ratio(4).ratio == 4


@pytest.mark.parametrize("window", [3, 8, 100])
def test_one_query_write_equals_unpacking_the_ring(window):
    """The decoding path edits one bit per key in the packed bytes; it equals unpacking, writing the column and
    repacking (the general path's two-query update, one query at a time), with rows at different positions."""
    g = torch.Generator().manual_seed(window)
    nb = (window + 7) // 8
    bits = torch.randint(0, 256, (2, 3, 7, nb), generator=g, dtype=torch.uint8)
    if window % 8:  # columns past the window are never written
        bits[..., -1] &= (1 << (window % 8)) - 1
    votes = torch.rand(2, 3, 1, 8, generator=g) < 0.5
    first = torch.tensor([5, window + 2])
    ring = torch.zeros(2, 3, 8, 8 * nb, dtype=torch.bool)
    ring[:, :, :7] = ((bits[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten(-2)
    for b in range(2):
        ring[b, :, :, int(first[b]) % window] = votes[b, :, 0]
    ours = window_update(bits, votes, first, window)
    assert torch.equal(window_counts(ours), ring.sum(-1))
    theirs = ((ours[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten(-2)
    assert torch.equal(theirs, ring)
