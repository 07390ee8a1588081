"""StreamingLLM (arXiv 2309.17453): sinks + recent window, checked against hand-built references."""

import pytest
import torch

from reference_impls import KVCache, StreamingLLM
from reference_impls.eviction.streamingllm import streaming_scores

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, ids,
                          left_padded_batch_equals_batch_one, memory_stays_at_budget)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, StreamingLLM(budget=budget), same_bytes=True)


@torch.no_grad()
@pytest.mark.parametrize("budget,n_sink", [(12, 4), (7, 1), (5, 0), (9, 9)])
def test_kept_positions_are_exactly_sinks_and_window(tiny, budget, n_sink):
    T = 50
    cache = KVCache(tiny, StreamingLLM(budget=budget, n_sink=n_sink))
    tiny(ids(T), cache=cache)
    expect = list(range(min(n_sink, budget))) + list(range(T - (budget - min(n_sink, budget)), T))
    for layer in cache.layers:
        slots = layer.store.kept_slots()
        assert slots.shape == (1, 2, budget)  # every layer and head keeps exactly the budget
        for h in range(2):
            assert slots[0, h].tolist() == expect


def test_scores_match_the_rule():
    pos = torch.tensor([[[0, 1, 2, 3, 4, 5, -1]]])
    s = streaming_scores(pos, n_sink=2)
    keep = s.topk(4).indices.sort().values[0, 0].tolist()
    assert keep == [0, 1, 4, 5] and s[0, 0, -1] == float("-inf")


@torch.no_grad()
def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions(tiny):
    """Reference: a plain transformers forward of prompt + new tokens with an explicit 4D mask that lets each
    new token see only the kept positions (and the new tokens before it) — positions are the original ones."""
    T, budget, n_sink, steps = 40, 12, 4, 5
    x = ids(T, seed=4)
    cache = KVCache(tiny, StreamingLLM(budget=budget, n_sink=n_sink))
    logits = tiny(x, cache=cache).logits[:, -1]
    seq = x
    for step in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        n = seq.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(T, n):  # each generated token saw what the cache held then: sinks + window, and itself
            kept = set(range(n_sink)) | set(range(i - (budget - n_sink), i)) | {i}
            mask[i] = torch.tensor([j in kept for j in range(n)])
        ref = tiny(seq, attention_mask=mask[None, None]).logits[:, -1]
        logits = tiny(tok, cache=cache).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-5), step


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    c = left_padded_batch_equals_batch_one(tiny, StreamingLLM(ratio=2, n_sink=2), steps=3)
    # each row keeps round(n_real / 2) tokens, as if alone
    held = c.layers[1].store.kept_slots()
    assert (held[0] >= 0).sum(-1).tolist() == [15, 15] and (held[1] >= 0).sum(-1).tolist() == [11, 11]


def test_memory_stays_at_the_budget_while_decoding(tiny):
    memory_stays_at_budget(tiny, StreamingLLM(budget=16))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="n_sink"):
        StreamingLLM(n_sink=-1)
    with pytest.raises(ValueError, match="budget"):
        StreamingLLM(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        StreamingLLM.from_ratio(0.9)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    achieved_ratio_is_on_target(*smollm, StreamingLLM)
