"""SnapKV (arXiv 2404.14469): window votes, pooling, GQA averaging, kept sets and decoding, against plain references."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction.snapkv import SnapKV, snapkv_scores
from reference_impls.models import tiny_llama

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one, spy)


def naive_snapkv(q, k, scaling, kernel, pooling):
    """Algorithm 1 with loops: per query head, window rows of softmax(qk^T) over the causal prefix+window,
    summed over the window, prefix pooled with zero padding, then the mean over the heads of each KV group."""
    B, H, w, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    G, P = H // H_kv, T - w
    out = torch.zeros(B, H_kv, T)
    for b in range(B):
        for h in range(H):
            votes = torch.zeros(P)
            for i in range(w):
                n = P + i + 1  # query i sees tokens 0 .. P + i
                row = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // G, j] * scaling for j in range(n)]), 0)
                votes += row[:P]
            pooled = torch.zeros(P)
            r = kernel // 2
            for j in range(P):
                nb = [votes[t] for t in range(j - r, j + r + 1) if 0 <= t < P]
                pooled[j] = sum(nb) / kernel if pooling == "avg" else max(nb)  # avg counts the zero padding
            out[b, h // G, :P] += pooled / G
    return out


@pytest.mark.parametrize("pooling,kernel", [("avg", 5), ("avg", 1), ("max", 3)])
def test_scores_equal_algorithm_1_written_with_loops(pooling, kernel):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 23, 8, generator=g)
    ours = snapkv_scores(q, k, 0.35, kernel_size=kernel, pooling=pooling)
    ref = naive_snapkv(q, k, 0.35, kernel, pooling)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours[..., -6:] == 0).all()  # the window itself is not scored by votes


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, SnapKV(budget=budget, window=8), same_bytes=True)


@torch.no_grad()
@pytest.mark.parametrize("budget,window", [(20, 8), (12, 12), (6, 8)])
def test_keeps_the_window_and_the_top_voted_prefix_in_every_layer_and_head(budget, window):
    """Kept = the window + the top (budget - window) prefix tokens by the loop reference's scores."""
    model, T = tiny_llama(), 50
    cache = KVCache(model, SnapKV(budget=budget, window=window))
    log = spy(cache)  # each layer's queries/keys as the store saw them
    model(ids(T, seed=2), cache=cache)
    for i, layer in enumerate(cache.layers):
        q, k, scaling = log[i][0]["q"], log[i][0]["k"], log[i][0]["scaling"]
        kept = layer.store.kept_slots()
        assert kept.shape == (1, 2, budget)
        if budget <= window:
            assert (kept == torch.arange(T - budget, T)).all()  # the most recent part of the window
            continue
        ref = naive_snapkv(q[:, :, -window:], k, scaling, 5, "avg")
        for h in range(2):
            top = ref[0, h, :T - window].topk(budget - window).indices.sort().values.tolist()
            assert kept[0, h].tolist() == top + list(range(T - window, T)), (i, h)


def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    decode_matches_reference(tiny_llama(), SnapKV(budget=15, window=6))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    c = left_padded_batch_equals_batch_one(tiny, SnapKV(ratio=2, window=6), steps=3)
    held = c.layers[1].store.kept_slots()
    prompt = (held >= 0) & (held < 30)  # the prompt's part (3 decoded tokens appended after it)
    assert prompt[0].sum(-1).tolist() == [15, 15] and prompt[1].sum(-1).tolist() == [11, 11]


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="window"):
        SnapKV(window=0)
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKV(kernel_size=4)
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(pooling="mean")
    with pytest.raises(ValueError, match="ratio"):
        SnapKV.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    achieved_ratio_is_on_target(*smollm, SnapKV)
