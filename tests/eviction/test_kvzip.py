"""KVzip (arXiv 2505.23416): reconstruction scores against a plain transformers forward, the global pair-level
selection, chunking, replay, padding, decoding and errors."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.base import Model, Step
from reference_impls.eviction.kvzip import FIRST, LATER, KVzip, kvzip_scores, repeat_inputs
from reference_impls.generation import greedy_generate
from reference_impls.integration import ATTN_NAME, model_info
from reference_impls.models import tiny_llama
from reference_impls.replay import cache_from_record, record_prefill

from evict_checks import budget_at_least_length_is_full, decode_matches_reference, ids, left_padded_batch_equals_batch_one


@torch.no_grad()
def reference_scores(model, x):
    """(L, H_kv, n): max attention over the repeat queries and each group's heads, from transformers' own eager
    attention weights of context + context (no tokenizer: the repeat input is the context itself, one chunk)."""
    n = x.shape[1]
    model.set_attn_implementation("eager")
    try:
        att = model(torch.cat([x, x], 1), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(ATTN_NAME)
    return torch.stack([a[0, :, n:, :n].amax(1).view(2, 2, n).amax(1) for a in att])  # 4 query heads, 2 KV heads


def test_scores_are_the_max_attention_of_the_repeat_pass_in_a_plain_transformers_forward():
    model, x = tiny_llama(), ids(30)
    steps = model_info(model).trace(torch.cat([x, x], 1))
    ours = torch.stack([kvzip_scores(s, 30, 0, 30)[0] for s in steps])
    assert torch.allclose(ours, reference_scores(model, x), atol=1e-5)


def test_a_chunk_softmax_sees_the_sinks_the_chunk_and_the_repeat_input_only():
    """Reference: Alg. 1 with loops, per query head and repeat query, the softmax over the allowed keys."""
    g = torch.Generator().manual_seed(0)
    T, m, start, end, sink = 40, 12, 10, 20, 3
    q, k = torch.randn(1, 4, m, 8, generator=g), torch.randn(1, 2, T, 8, generator=g)
    step = Step.dense(q, k, k, scaling=0.4)
    ref = torch.zeros(2, end - start)
    for h in range(4):
        for i in range(m):
            keys = [j for j in range(T - m + i + 1) if j < sink or start <= j < end or j >= T - m]
            p = torch.softmax(torch.stack([q[0, h, i] @ k[0, h // 2, j] * 0.4 for j in keys]), 0)
            for j, pj in zip(keys, p):
                if start <= j < end:
                    ref[h // 2, j - start] = max(ref[h // 2, j - start], pj)
    assert torch.allclose(kvzip_scores(step, m, start, end, sink)[0], ref, atol=1e-6)


class Tok:
    """A toy tokenizer with a chat template: a user turn ends with '</u><a>'."""
    chat_template = "toy"

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 60 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<s><u>" + messages[0]["content"] + "</u><a>"


def test_repeat_inputs_chunk_the_context_with_the_official_prompts():
    tok, ctx = Tok(), ids(25)
    enc = lambda s: torch.tensor([tok.encode(s)])  # noqa: E731
    chunks = repeat_inputs(ctx, tok, 10)
    assert [(s, e) for s, e, _ in chunks] == [(0, 10), (10, 20), (20, 25)]
    assert torch.equal(chunks[0][2], torch.cat([enc(FIRST), enc("</u><a>"), ctx[:, :10]], 1))
    assert torch.equal(chunks[2][2], torch.cat([enc(LATER), ctx[:, 12:20], enc("</u><a>"), ctx[:, 20:]], 1))
    assert torch.equal(repeat_inputs(ctx, None, 100)[0][2], ctx)  # no tokenizer: the context alone


@torch.no_grad()
@pytest.mark.parametrize("heads", ["threshold", "uniform"])
def test_keeps_the_top_pairs_over_all_layers_and_heads_or_per_head(heads):
    model, x = tiny_llama(), ids(40, seed=3)
    S = reference_scores(model, x)  # (L, H_kv, 40)
    method = KVzip(ratio=4, n_sink=0, heads=heads) if heads == "uniform" else KVzip(ratio=4, n_sink=0)
    cache = KVCache(model, method)
    model(x, cache=cache)
    kept = [[sorted(j for j in h.tolist() if j >= 0) for h in layer.store.kept_slots()[0]] for layer in cache.layers]
    if heads == "uniform":  # official "pair-uniform": each head its 10 best
        want = [[sorted(S[l, h].topk(10).indices.tolist()) for h in range(2)] for l in range(2)]
    else:  # the 2 layers x 2 heads x 10 best pairs of the whole model, wherever they are
        flat = torch.zeros(S.numel(), dtype=torch.bool)
        flat[S.flatten().topk(40).indices] = True
        want = [[torch.nonzero(flat.view_as(S)[l, h]).flatten().tolist() for h in range(2)] for l in range(2)]
        assert len({len(h) for layer in want for h in layer}) > 1  # the heads really keep different counts
    assert kept == want
    assert sum(len(h) for layer in kept for h in layer) == 40


def test_sinks_are_kept_and_counted_in_the_budget():
    model = tiny_llama()
    cache = KVCache(model, KVzip(ratio=5, n_sink=4))
    with torch.no_grad():
        model(ids(40), cache=cache)
    held = [set(h.tolist()) for layer in cache.layers for h in layer.store.kept_slots()[0]]
    assert all({0, 1, 2, 3} <= h for h in held) and sum(len(h - {-1}) for h in held) == 2 * 2 * 8


@pytest.mark.parametrize("budget", [40, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, KVzip(budget=budget), same_bytes=True)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    decode_matches_reference(tiny_llama(), KVzip(ratio=3))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, KVzip(ratio=2), ragged=True)


@torch.no_grad()
def test_replayed_prefill_reads_the_same_ids_and_keeps_the_same_pairs_as_live():
    model, x, q = tiny_llama(), ids(36, seed=7), ids(5, seed=8)
    live = KVCache(model, KVzip(ratio=3))
    gen = greedy_generate(model, live, [x, q], 4)
    rec = record_prefill(model, x)
    replayed = cache_from_record(model, KVzip(ratio=3), rec)
    assert torch.equal(replayed.model_info.token_ids(torch.arange(36)[None]), x)
    for a, b in zip(live.layers, replayed.layers):
        prompt = [[j for j in h.tolist() if 0 <= j < 36] for h in a.store.kept_slots()[0]]
        assert prompt == [[j for j in h.tolist() if j >= 0] for h in b.store.kept_slots()[0]]
    assert greedy_generate(model, replayed, [q], 4).tokens == gen.tokens


def test_bad_parameters_and_a_model_without_trace_are_rejected():
    with pytest.raises(ValueError, match="chunk_size"):
        KVzip(chunk_size=0)
    with pytest.raises(ValueError, match="n_sink"):
        KVzip(n_sink=-1)
    with pytest.raises(ValueError, match="ratio"):
        KVzip.from_ratio(0.5)
    with pytest.raises(ValueError, match="needs Model.trace"):
        KVzip().new_layer(0, Model())
    assert KVzip.from_ratio(4).ratio == 4 and KVzip.from_ratio(4, budget=7).budget == 7


def test_full_is_untouched_by_a_trace_during_a_prefill():
    """The trace runs a nested forward inside the cache's prefill: the outer pass's logits must not change."""
    model, x = tiny_llama(), ids(30)
    with torch.no_grad():
        full = model(x, cache=KVCache(model, Full())).logits
        ours = model(x, cache=KVCache(model, KVzip(ratio=2))).logits
    assert torch.equal(full, ours)
