"""LagKV (arXiv 2504.04704): lag-relative scores with loops, the official per-partition selection, invariants."""

import statistics

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.lagkv import LagKV, lag_relative_scores, lagkv_scores
from reference_impls.models import tiny_llama

from evict_checks import budget_at_least_length_is_full, decode_matches_reference, ids, kept_counts_equal_budget, spy


def naive_partition_scores(x, start, lag):
    """Section 3 with loops, for one head x (T, D): every token of partition p (from `start`) normalised per channel by
    the min/max of partition p + 1, sample std over channels, softmax within the partition. {token index: score}."""
    T, D = x.shape
    P = (T - start) // lag
    out = {}
    for p in range(P - 1):
        cur = range(start + p * lag, start + (p + 1) * lag)
        ref = range(start + (p + 1) * lag, start + (p + 2) * lag)
        lo = [min(x[j, c].item() for j in ref) for c in range(D)]
        hi = [max(x[j, c].item() for j in ref) for c in range(D)]
        spread = torch.tensor([statistics.stdev((x[i, c].item() - lo[c]) / (hi[c] - lo[c]) for c in range(D))
                               for i in cur])
        out.update(zip(cur, torch.softmax(spread, 0).tolist()))
    return out


def official_keep(k, v, n_sink, lag, per_partition):
    """The official `_compress_algo` rule for one head: sinks, the top `per_partition` of key + value scores in every
    partition that has a successor, and the rest (the last full partition and the remainder) in full."""
    T = k.shape[0]
    ks, vs = naive_partition_scores(k, n_sink, lag), naive_partition_scores(v, n_sink, lag)
    P = (T - n_sink) // lag
    keep = list(range(n_sink))
    for p in range(P - 1):
        part = range(n_sink + p * lag, n_sink + (p + 1) * lag)
        keep += sorted(part, key=lambda i: -(ks[i] + vs[i]))[:per_partition]
    keep += range(n_sink + (P - 1) * lag, T)
    return sorted(keep)


def test_lag_relative_scores_equal_the_loops():
    x = torch.randn(1, 2, 3 * 6 + 1, 5, generator=torch.Generator().manual_seed(0))
    ours = lag_relative_scores(x[:, :, 1:], 6)  # 3 partitions after one sink: the first two are scored
    for h in range(2):
        ref = naive_partition_scores(x[0, h], 1, 6)
        assert torch.allclose(ours[0, h], torch.tensor([ref[i] for i in sorted(ref)]), atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("n_sink,lag,per_partition", [(4, 8, 3), (2, 6, 1), (0, 10, 5)])
def test_keeps_the_official_per_partition_top_in_every_layer_and_head(n_sink, lag, per_partition):
    """With the budget the official rule ends up with (sinks + per_partition per scored partition + tail), the global
    top-k of the partition ranks keeps exactly the official selection."""
    model, T = tiny_llama(), 53
    P = (T - n_sink) // lag
    budget = n_sink + per_partition * (P - 1) + (T - n_sink - (P - 1) * lag)
    cache = KVCache(model, LagKV(budget=budget, n_sink=n_sink, lag_size=lag))
    values = {}
    for i, layer in enumerate(cache.layers):  # record the values the store scored
        orig = layer.store.after_attention
        layer.store.after_attention = lambda step, i=i, orig=orig: (values.setdefault(i, step.values.clone()),
                                                                   orig(step))
    log = spy(cache)
    model(ids(T, seed=2), cache=cache)
    for i, layer in enumerate(cache.layers):
        k, v = log[i][0]["k"][0], values[i][0]
        for h in range(k.shape[0]):
            expect = official_keep(k[h], v[h], n_sink, lag, per_partition)
            assert layer.store.kept_slots()[0, h].tolist() == expect, (i, h)


def test_short_prompts_and_small_budgets_keep_sinks_then_the_most_recent():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 1, 20, 4, generator=g), torch.randn(1, 1, 20, 4, generator=g)
    short = lagkv_scores(k, v, n_sink=2, lag_size=10)  # 20 < 2 + 2 * 10: nothing to score
    assert short[0, 0].topk(7).indices.sort().values.tolist() == [0, 1, 15, 16, 17, 18, 19]
    scored = lagkv_scores(k, v, n_sink=2, lag_size=6)  # partitions 2-7, 8-13 (scored), 14-19 (their reference: tail)
    assert (scored[0, 0, 2:14] < 1).all() and (scored[0, 0, 14:] >= 1).all()
    assert scored[0, 0].topk(7).indices.sort().values.tolist() == [0, 1] + list(range(15, 20))


def test_ties_between_partitions_go_to_the_later_one_and_cross_scoring_compares_raw_scores():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 1, 4 * 5, 3, generator=g), torch.randn(1, 1, 4 * 5, 3, generator=g)
    ranked = lagkv_scores(k, v, n_sink=0, lag_size=5)[0, 0, :15]  # 3 scored partitions of 5
    best = [max(range(p * 5, p * 5 + 5), key=lambda i: ranked[i].item()) for p in range(3)]
    assert ranked[best].tolist() == sorted(ranked[best].tolist())  # equal ranks: later partition first
    assert ranked.topk(3).indices.sort().values.tolist() == best  # one per partition
    raw = lagkv_scores(k, v, n_sink=0, lag_size=5, cross_scoring=True)[0, 0, :15]
    ref = (lag_relative_scores(k, 5) + lag_relative_scores(v, 5))[0, 0] / 2
    assert torch.allclose(raw, ref[:15])


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, LagKV(budget=17, lag_size=8), budget=17)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, LagKV(budget=budget, lag_size=8), same_bytes=True)


@torch.no_grad()
def test_left_padded_batch_gives_the_same_answers_as_batch_one_when_positions_skip_the_padding():
    """LagKV reads post-RoPE keys channel by channel, so its scores depend on absolute RoPE positions (unlike
    attention): a left-padded row matches the row alone when its positions count from its first real token, as
    `generate` sets them (evict_checks' helper keeps transformers' default, padding counted)."""
    model, method = tiny_llama(), LagKV(ratio=2, n_sink=2, lag_size=5)
    a, b = ids(30, seed=5), ids(22, seed=6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    c = KVCache(model, method)
    out = model(batch, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=c).logits[:, -1]
    nxt = model(torch.tensor([[11], [11]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                position_ids=torch.tensor([[30], [22]]), cache=c).logits[:, -1]
    for row, (x, shift) in enumerate(((a, 0), (b, 8))):
        alone = KVCache(model, method)
        assert torch.allclose(out[row], model(x, cache=alone).logits[0, -1], atol=1e-5)
        assert torch.allclose(nxt[row], model(torch.tensor([[11]]), cache=alone).logits[0, -1], atol=1e-5)
        for layer, single in zip(c.layers, alone.layers):
            held = [sorted(t - shift for t in h.tolist() if t >= 0) for h in layer.store.kept_slots()[row]]
            assert held == single.store.kept_slots()[0].tolist(), row


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    decode_matches_reference(tiny_llama(), LagKV(budget=20, lag_size=6))


def test_bad_parameters_are_rejected():
    for knob, value in (("n_sink", -1), ("lag_size", 0), ("cross_scoring", "no")):
        with pytest.raises(ValueError, match=knob):
            LagKV(**{knob: value})
    with pytest.raises(ValueError, match="ratio"):
        LagKV.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    from evict_checks import achieved_ratio_is_on_target

    achieved_ratio_is_on_target(*smollm, LagKV)
