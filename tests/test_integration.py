"""The transformers glue: KVCache + the kvatlas attention, checked against plain transformers and by hand."""

import pytest
import torch

from reference_impls import Full, KVCache, StreamingLLM
from reference_impls.eviction.h2o import H2O
from reference_impls.base import DenseStore, KVMethod
from reference_impls.generation import greedy_generate
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


@torch.no_grad()
def test_full_cache_matches_plain_transformers(tiny):
    x = ids(33)
    ref = tiny(x).logits  # transformers' own DynamicCache path
    cache = KVCache(tiny, Full())
    assert torch.allclose(tiny(x, cache=cache).logits, ref, atol=1e-6)
    assert cache.get_seq_length() == 33
    # decode continues with positions from the true length
    nxt = torch.tensor([[7]])
    full_ref = tiny(torch.cat([x, nxt], 1)).logits[:, -1]
    assert torch.allclose(tiny(nxt, cache=cache).logits[:, -1], full_ref, atol=1e-5)


@torch.no_grad()
def test_generate_uses_the_cache_and_matches_our_loop(tiny):
    x = ids(30, seed=1)
    ref = tiny.generate(x, max_new_tokens=6, do_sample=False)  # plain DynamicCache
    ours = tiny.generate(x, cache=KVCache(tiny, Full()), max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref)
    cache = KVCache(tiny, StreamingLLM(budget=10))
    g = tiny.generate(x, cache=cache, max_new_tokens=6, do_sample=False)
    loop = greedy_generate(tiny, KVCache(tiny, StreamingLLM(budget=10)), [x], 6)
    assert g[0, 30:].tolist() == loop.tokens
    assert cache.get_seq_length() == 35  # tokens seen (the 6th token is never fed back)


@torch.no_grad()
def test_nbytes_are_measured_from_held_tensors(tiny):
    x = ids(40)
    cache = KVCache(tiny, Full())
    tiny(x, cache=cache)
    held = sum(l.store.k.nbytes + l.store.v.nbytes for l in cache.layers)
    cfg = tiny.config
    assert cache.nbytes() == held == cache.full_nbytes() == 2 * cfg.num_hidden_layers * 2 * 40 * 16 * 4


@torch.no_grad()
def test_replay_from_record_equals_live_run(tiny):
    x, q = ids(50, seed=2), ids(6, seed=3)
    method = StreamingLLM(budget=17)
    live = greedy_generate(tiny, KVCache(tiny, method), [x, q], 8)
    rec = record_prefill(tiny, x)
    replay = greedy_generate(tiny, cache_from_record(tiny, method, rec), [q], 8)
    assert live.tokens == replay.tokens and live.kv_bytes == replay.kv_bytes
    # H2O asks for the prefill's attention weights; a second cache from the same record reuses them exactly
    h2o_live = greedy_generate(tiny, KVCache(tiny, H2O(budget=20)), [x, q], 8)
    first = cache_from_record(tiny, H2O(budget=20), rec)
    assert rec.probs[0].shape == (1, 4, 50, 50)
    shared = rec.probs[0]
    again = greedy_generate(tiny, cache_from_record(tiny, H2O(budget=20), rec), [q], 8)
    assert rec.probs[0] is shared and again.tokens == h2o_live.tokens == greedy_generate(tiny, first, [q], 8).tokens
    # the shared weights still give each budget's live result
    for budget in (12, 30):
        live_b = greedy_generate(tiny, KVCache(tiny, H2O(budget=budget)), [x, q], 8)
        replay_b = greedy_generate(tiny, cache_from_record(tiny, H2O(budget=budget), rec), [q], 8)
        assert replay_b.tokens == live_b.tokens and replay_b.kv_bytes == live_b.kv_bytes


@torch.no_grad()
def test_compression_armed_once_then_question_is_kept(tiny):
    """Query-agnostic: the context is compressed, the question appended after it is not."""
    cache = KVCache(tiny, StreamingLLM(budget=12))
    tiny(ids(40), cache=cache)
    assert cache.compress_next is False and cache.compressed_at == 40
    store = cache.layers[0].store
    assert store.kept_slots().shape[-1] == 12
    tiny(ids(5, seed=9), cache=cache)  # StreamingLLM evicts while decoding: back to the budget
    assert store.kept_slots().shape[-1] == 12 and store.kept_slots()[0, 0, -1].item() == 44


class _KeepAll(KVMethod):
    def new_layer(self, layer_idx, model):
        return DenseStore()


def test_errors_are_clear(tiny):
    with pytest.raises(TypeError, match="KVMethod"):
        KVCache(tiny, "streamingllm")
    cache = KVCache(tiny, _KeepAll())
    with pytest.raises(NotImplementedError, match="not croppable"):
        cache.crop(3)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        StreamingLLM(ratio=0.5)
    assert Full.from_ratio(2) == Full()  # the full cache ignores a target ratio (it is the 1x)


class _SpyStore(DenseStore):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def after_attention(self, step):
        self.log.append(step)


class _Spy(KVMethod):
    def __init__(self):
        self.steps = []

    def new_layer(self, layer_idx, model):
        self.model = model
        return _SpyStore(self.steps)


@torch.no_grad()
def test_the_model_gives_stores_token_ids_and_its_rope(tiny):
    x = ids(12, seed=4)
    spy = _Spy()
    out = tiny.generate(x, cache=KVCache(tiny, spy), max_new_tokens=3, do_sample=False)
    last = spy.steps[-1]
    assert spy.model.num_layers == tiny.config.num_hidden_layers
    # every id fed so far, by position (the last generated one is never fed)
    assert torch.equal(spy.model.token_ids(last.positions[:, 0]), out[:, :-1])
    # a recorded prefill gives the same ids
    rec = record_prefill(tiny, x)
    spy2 = _Spy()
    cache_from_record(tiny, spy2, rec)
    assert torch.equal(spy2.model.token_ids(spy2.steps[0].positions[:, 0]), x)
    # rope: the model's own rotary embedding at the given positions
    pos = torch.arange(12)[None]
    cos, sin = spy.model.rope(pos)
    ref_cos, ref_sin = tiny.model.rotary_emb(torch.empty(0), pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and cos.shape == (1, 12, 16)
    # fed embeddings instead of ids: unknown, and stays unknown
    spy3 = _Spy()
    cache = KVCache(tiny, spy3)
    tiny(inputs_embeds=tiny.get_input_embeddings()(x), cache=cache)
    tiny(torch.tensor([[5]]), cache=cache)
    with pytest.raises(ValueError, match="fed embeddings"):
        spy3.model.token_ids(spy3.steps[-1].positions)
