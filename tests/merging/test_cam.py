"""CaM (ICML 2024): the merge rule against a plain loop, on random tensors and inside the model; the base eviction's
tokens kept; merged value mass conserved; draws reproducible; budgets, padding, decoding, errors."""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.streamingllm import StreamingLLM
from reference_impls.generation import greedy_generate
from reference_impls.merging.cam import CaM, cam_merge, cam_stream, uniform_hash

from evict_checks import (budget_at_least_length_is_full, ids, kept_counts_equal_budget,
                          left_padded_batch_equals_batch_one, memory_stays_at_budget)


def plain_cam(values, kept, attn, positions, out, draws, m):
    """The rule per head as a loop: an evicted token e merges, when its draw is below
    min(1, A_e / mean of A over the m kept tokens after it), v_e / |targets| into each of those tokens."""
    merged = [values[i].clone() for i in kept]
    for e in range(values.shape[0]):
        if not out[e]:
            continue
        after = [j for j, i in enumerate(kept) if positions[i] > positions[e]][:m]
        if not after:
            continue
        mean = sum(float(attn[kept[j]]) for j in after) / len(after)
        p = min(1.0, float(attn[e]) / mean) if mean > 0 else (1.0 if attn[e] > 0 else 0.0)
        if float(draws[e]) < p:
            for j in after:
                merged[j] += values[e] / len(after)
    return merged


def plain_stream(values, attn_rows, out, draws, R, m):
    """The prompt streamed as the official lm-eval loop: token e leaves when R tokens follow it; if then its draw
    is below min(1, its attention / the mean attention of its next min(m, R) tokens, both summed over the
    queries up to e + R - 1), its current value (with what it received) is split over those next tokens."""
    T = values.shape[0]
    v = values.clone()
    for e in range(T):
        targets = [j for j in range(e + 1, min(e + min(m, R), T - 1) + 1)]
        if not out[e] or not targets:
            continue
        rows = attn_rows[: min(e + R, T)]  # queries 0 .. e + R - 1
        a = lambda x: float(rows[:, x].sum())  # noqa: E731
        mean = sum(a(j) for j in targets) / len(targets)
        p = min(1.0, a(e) / mean) if mean > 0 else (1.0 if a(e) > 0 else 0.0)
        if float(draws[e]) < p:
            for j in targets:
                v[j] += v[e] / len(targets)
    return v


@pytest.mark.parametrize("m", [1, 4, 32])
def test_prefill_stream_equals_the_official_loop(m):
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 2, 2, 18, 3
    values = torch.randn(B, H, T, D, generator=g)
    probs = torch.softmax(torch.randn(B, H, T, T, generator=g).masked_fill(~torch.ones(T, T).bool().tril(), -1e9), -1)
    out = torch.rand(B, H, T, generator=g) < 0.6
    draws = torch.rand(B, H, T, generator=g)
    recent = torch.tensor([[3, 6], [0, 20]])
    ours = cam_stream(values, probs, out, draws, recent, m)
    for b in range(B):
        for h in range(H):
            ref = plain_stream(values[b, h], probs[b, h], out[b, h], draws[b, h], int(recent[b, h]), m)
            assert torch.allclose(ours[b, h], ref, atol=1e-5), (b, h)
    assert torch.equal(cam_stream(values, probs, out, torch.ones_like(draws), recent, m), values)  # nothing merged


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = 2, 3, 16, 4
    values = torch.randn(B, H, T, D, generator=g)
    positions = torch.arange(T).expand(B, H, T).clone()
    positions[1, :, :3] = -1  # row 1: 3 padding slots
    attn = torch.rand(B, H, T, generator=g) * (torch.rand(B, H, T, generator=g) > 0.2)  # some never attended
    counts = torch.tensor([[5, 7, 3], [6, 2, 4]])  # heads keep different numbers (holes)
    W = int(counts.max())
    idx, hole = torch.zeros(B, H, W, dtype=torch.long), torch.ones(B, H, W, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            real = [t for t in range(T) if positions[b, h, t] >= 0]
            pick = sorted(real[i] for i in torch.randperm(len(real), generator=g)[: counts[b, h]].tolist())
            idx[b, h, : len(pick)], hole[b, h, : len(pick)] = torch.tensor(pick), False
    kept_mask = torch.zeros(B, H, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kept_mask[b, h, idx[b, h][~hole[b, h]]] = True
    out = (positions >= 0) & ~kept_mask
    draws = torch.rand(B, H, T, generator=g)
    return values, idx, hole, out, attn, positions, draws


@pytest.mark.parametrize("m", [1, 3, 32])
def test_decoding_merge_equals_the_rule_written_as_a_loop(m):
    values, idx, hole, out, attn, positions, draws = random_case()
    kept_v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
    ours = cam_merge(values, kept_v, idx, hole, out, attn, positions, draws, m)
    for b in range(2):
        for h in range(3):
            kept = idx[b, h][~hole[b, h]].tolist()
            ref = plain_cam(values[b, h], kept, attn[b, h], positions[b, h], out[b, h], draws[b, h], m)
            for j, r in enumerate(ref):
                assert torch.allclose(ours[b, h, j], r, atol=1e-6), (b, h, j)


def test_every_merged_value_is_spread_whole_over_its_targets():
    """Merging conserves value mass: what the kept values gain is the sum of the merged tokens' values."""
    values, idx, hole, out, attn, positions, _ = random_case(1)
    attn = attn + 0.1  # everyone attended: p > 0, and a zero draw always merges
    kept_v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
    ours = cam_merge(values, kept_v, idx, hole, out, attn, positions, torch.zeros_like(attn), 4)
    for b in range(2):
        for h in range(3):
            last = max(int(positions[b, h, i]) for i in idx[b, h][~hole[b, h]])
            merged = [e for e in range(16) if out[b, h, e] and positions[b, h, e] < last]  # a kept token after
            gain = (ours[b, h] - kept_v[b, h])[~hole[b, h]].sum(0)
            assert torch.allclose(gain, sum(values[b, h, e] for e in merged), atol=1e-5)


def test_draws_are_reproducible_uniform_and_depend_on_seed_layer_head_and_position():
    pos = torch.arange(4000).expand(1, 2, 4000)
    u = uniform_hash(0, 3, pos)
    assert torch.equal(u, uniform_hash(0, 3, pos.clone()))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02
    assert float((u[0, 0] < 0.25).float().mean()) == pytest.approx(0.25, abs=0.03)
    for other in (uniform_hash(1, 3, pos), uniform_hash(0, 4, pos), u[:, [1, 0]], uniform_hash(0, 3, pos + 1)):
        assert not torch.equal(u, other)


@torch.no_grad()
@pytest.mark.parametrize("base", ["streamingllm", "h2o"])
def test_on_the_model_the_prefill_follows_the_loop_and_keys_stay(tiny, base):
    """Prefill: each layer's kept values are the streamed loop's, on the step's values, with the attention written
    as a loop (softmax per query head over the causal prefix, mean over the GQA group)."""
    cache = KVCache(tiny, CaM(budget=12, base=base, merge_budget=4))
    seen = {}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig):
            seen[i] = (step.queries.clone(), step.keys.clone(), step.values.clone(), step.scaling)
            orig(step)
        layer.store.after_attention = wrapped
    tiny(ids(30), cache=cache)
    R = 12 - 4 if base == "streamingllm" else 6  # the recent window: budget - sinks, or budget - heavy half
    for i, layer in enumerate(cache.layers):
        q, k, v, scaling = seen[i]
        H, H_kv, T = q.shape[1], k.shape[1], k.shape[2]
        rows = torch.zeros(H_kv, T, T)
        for h in range(H):
            for t in range(T):
                logits = torch.stack([q[0, h, t] @ k[0, h // 2, j] * scaling for j in range(t + 1)])
                rows[h // 2, t, : t + 1] += torch.softmax(logits, 0) / 2
        kept = layer.store.kept_slots()[0]
        draws = uniform_hash(0, i, torch.arange(T).expand(1, H_kv, T))[0]
        for h in range(H_kv):
            keep = kept[h].tolist()
            out = torch.tensor([t not in keep for t in range(T)])
            ref = plain_stream(v[0, h], rows[h], out, draws[h], R, 4)
            assert torch.allclose(layer.store.v[0, h], ref[keep], atol=1e-5), (i, h)
            assert torch.equal(layer.store.k[0, h], k[0, h, keep])


@torch.no_grad()
def test_keeps_streamingllms_tokens_and_merges_while_decoding(tiny):
    x = ids(40)
    cam, plain = KVCache(tiny, CaM(budget=12)), KVCache(tiny, StreamingLLM(budget=12))
    for c in (cam, plain):
        tiny(x, cache=c)
    for t in range(6):
        for c in (cam, plain):
            tiny(torch.tensor([[20 + t]]), cache=c)
        for a, b in zip(cam.layers, plain.layers):
            assert torch.equal(a.store.kept_slots(), b.store.kept_slots())
        # layer 0's keys come from the embeddings alone: the same tokens' keys, untouched by merging
        assert torch.allclose(cam.layers[0].store.k, plain.layers[0].store.k, atol=1e-6)
    assert any(not torch.allclose(a.store.v, b.store.v) for a, b in zip(cam.layers, plain.layers))


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, CaM(budget=14), budget=14)
    kept_counts_equal_budget(tiny, CaM(budget=14, base="h2o"), budget=14)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, CaM(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, CaM(ratio=2, merge_budget=3), steps=3)


def test_memory_stays_at_the_budget_while_decoding_and_generation_runs(tiny):
    memory_stays_at_budget(tiny, CaM(budget=16))
    gen = greedy_generate(tiny, KVCache(tiny, CaM(ratio=4)), [ids(60)], 6)
    assert len(gen.tokens) == 6 and gen.full_kv_bytes / gen.kv_bytes > 1.8  # fp32 tiny model: 2 x the 16-bit unit
    assert math.isfinite(gen.kv_bytes_end)


def test_bad_parameters_are_rejected():
    for knob, value in [("base", "snapkv"), ("n_sink", -1), ("heavy_fraction", 2), ("merge_budget", 0),
                        ("seed", 1.5)]:
        with pytest.raises(ValueError, match=knob):
            CaM(**{knob: value})
    with pytest.raises(ValueError, match="ratio"):
        CaM.from_ratio(0.5)
