"""The interface's hooks for the families beyond eviction and quantization: a store that reads a subset
(`LayerStore.select`, retrieval), a logit bias, a term on the attention output (`LayerStore.mix`), the other
layers' stores (`Model.stores`, cross-layer), the projection weights, calibration prefills, token
log-probabilities, traces (`Model.trace`) and prompt compression (`KVMethod.compress_prompt`)."""

from dataclasses import dataclass

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.base import DenseStore, KVMethod, Model, nbytes
from reference_impls.calibration import calibration_ids, calibration_steps
from reference_impls.compose import Compose
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.generation import greedy_generate, shorten_prompt
from reference_impls.integration import model_info
from reference_impls.models import tiny_llama
from reference_impls.quantization.kivi import KIVI
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


class FirstKeysStore(DenseStore):
    """Toy retrieval: hold everything, let a decoding query read only the first `k` keys and its own."""

    def __init__(self, k):
        super().__init__()
        self.k_read, self.read = k, None

    def select(self, step):
        if step.q_len > 1:
            return None  # the prompt attends in full, as retrieval methods prefill
        T = step.keys.shape[2]
        sel = torch.zeros(T, dtype=torch.bool)
        sel[: self.k_read] = True
        sel[-1] = True
        self.read = nbytes(self.k[:, :, : self.k_read + 1], self.v[:, :, : self.k_read + 1])
        return sel.expand(*step.keys.shape[:2], 1, T)

    def read_nbytes(self):
        return self.read


@dataclass
class FirstKeys(KVMethod):
    k: int = 5

    def new_layer(self, layer_idx, model):
        return FirstKeysStore(self.k)


@torch.no_grad()
def test_select_restricts_what_decoding_reads_and_reports_the_bytes_read(tiny=None):
    model, x, k, steps = tiny_llama(), ids(30), 5, 3
    cache = KVCache(model, FirstKeys(k))
    logits = model(x, cache=cache).logits[:, -1]
    assert torch.allclose(logits, model(x).logits[:, -1], atol=1e-5)  # the prompt read everything
    seq = x
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        n = seq.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(30, n):  # reference: each new token sees the first k tokens and itself only
            mask[i] = False
            mask[i, :k] = True
            mask[i, i] = True
        ref = model(seq, attention_mask=mask[None, None]).logits[:, -1]
        logits = model(tok, cache=cache).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-5)
    held = cache.nbytes()
    assert cache.read_nbytes() == 2 * 2 * 2 * (k + 1) * 16 * 4 < held  # 2 layers x K,V x 2 heads x 6 keys x D x fp32
    gen = greedy_generate(model, KVCache(model, FirstKeys(k)), [x], 4)
    assert gen.read_kv_bytes == 2 * 2 * 2 * (k + 1) * 16 * 4
    assert greedy_generate(model, KVCache(model, Full()), [x], 4).read_kv_bytes is None  # reads all it holds


@torch.no_grad()
def test_a_replayed_prefill_calls_select_too():
    model, x = tiny_llama(), ids(40)
    live = greedy_generate(model, KVCache(model, FirstKeys(3)), [x], 5)
    rec = record_prefill(model, x)
    replayed = greedy_generate(model, cache_from_record(model, FirstKeys(3), rec), [], 5, logits=rec.logits)
    assert live.tokens == replayed.tokens


class SharedStore(DenseStore):
    """Toy cross-layer sharing: layer 1 attends with layer 0's keys and values and holds nothing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def append(self, k, v):
        owner = self.model.stores[0]
        return owner.k, owner.v, None

    def nbytes(self):
        return 0


@dataclass
class ShareLayer0(KVMethod):
    def new_layer(self, layer_idx, model):
        return DenseStore() if layer_idx == 0 else SharedStore(model)


@torch.no_grad()
def test_stores_give_each_store_the_other_layers():
    model, x = tiny_llama(), ids(20)
    cache = KVCache(model, ShareLayer0())
    assert cache.model_info.stores == [layer.store for layer in cache.layers]
    seen = {}
    orig = cache.layers[1].store.after_attention
    cache.layers[1].store.after_attention = lambda step: (seen.setdefault("k", step.keys), orig(step))
    model(x, cache=cache)
    assert seen["k"] is cache.layers[0].store.k  # layer 1's attention used layer 0's keys
    assert cache.nbytes() == cache.layers[0].store.nbytes() == cache.full_nbytes() // 2


def test_weights_are_the_projections():
    model = tiny_llama()
    w = model_info(model).weights(1)
    attn = model.model.layers[1].self_attn
    assert set(w) == {"q", "k", "v", "o"} and torch.equal(w["k"], attn.k_proj.weight)
    assert w["q"].shape == (64, 64) and w["k"].shape == (32, 64) and w["o"].shape == (64, 64)


@torch.no_grad()
def test_calibration_is_a_recorded_prefill_memoised_per_model():
    model = tiny_llama()
    steps = model_info(model).calibration("repeat", 64)
    x = calibration_ids("repeat", 64, vocab_size=128)
    assert torch.equal(x[:, :32], x[:, 32:])  # the same random tokens twice
    rec = record_prefill(model, x)
    assert len(steps) == 2 and all(torch.equal(s.keys, k) for s, k in zip(steps, rec.keys))
    assert all(torch.equal(s.queries, q) for s, q in zip(steps, rec.queries))
    again = calibration_steps(model, None, "repeat", 64)
    assert again[0].keys is steps[0].keys  # memoised: one prefill per model and text
    assert torch.equal(calibration_ids("stdlib", 16, None, 128), calibration_ids("random", 16, None, 128))
    with pytest.raises(ValueError, match="calibration text must be one of stdlib, passkey, repeat, random"):
        calibration_ids("wiki", 64, vocab_size=128)
    with pytest.raises(ValueError, match="calibration tokens must be an int >= 8"):
        calibration_ids("random", 4, vocab_size=128)


@torch.no_grad()
def test_logprobs_are_the_models_next_token_log_probabilities():
    model, x = tiny_llama(), ids(12)
    lp = model_info(model).logprobs(x)
    ref = torch.log_softmax(model(x).logits[0].float(), -1)
    assert lp.shape == (1, 12) and lp[0, 0] == 0
    for t in range(1, 12):
        assert torch.isclose(lp[0, t], ref[t - 1, x[0, t]], atol=1e-5)


@torch.no_grad()
def test_trace_is_an_uncompressed_prefill_of_other_tokens_with_each_layers_hidden_states():
    """Reference: a plain transformers forward with output_hidden_states; each layer's attention output is what turns
    its input into the next layer's input through the layer's own MLP block: x' = h + mlp(norm(h)), h = x + a."""
    model, x = tiny_llama(), ids(15)
    info = model_info(model)
    steps = info.trace(x)
    rec = record_prefill(model, x)
    assert len(steps) == 2 and all(torch.equal(s.keys, k) and torch.equal(s.queries, q)
                                   for s, q, k in zip(steps, rec.queries, rec.keys))
    hs = model(x, output_hidden_states=True).hidden_states
    for layer, s in enumerate(steps):
        inp, attn = s.hidden
        assert inp.shape == attn.shape == (1, 15, 64) and torch.allclose(inp, hs[layer], atol=1e-6)
        block = model.model.layers[layer]
        h = inp + attn
        nxt = h + block.mlp(block.post_attention_layernorm(h))
        if layer + 1 < len(steps):  # the last hidden state of transformers' tuple has the final norm applied
            assert torch.allclose(nxt, hs[layer + 1], atol=1e-5)
    assert steps[1].last(4).hidden[0].shape == (1, 4, 64)  # last(n) keeps the last n tokens' hidden states
    assert info.trace(x.clone()) is steps  # memoised per ids: every layer's store shares one forward ...
    assert model_info(model).trace(x) is steps  # ... and every cache of the model
    assert info.trace(ids(15, seed=1)) is not steps
    with pytest.raises(ValueError, match=r"trace takes token ids of shape \(1, T\)"):
        info.trace(torch.cat([x, x]))


@dataclass
class EveryOther(KVMethod):
    """Toy prompt compression: keep every other context token (the question, when shown, is never dropped)."""

    def compress_prompt(self, context, question, model):
        return context[:, ::2]

    def new_layer(self, layer_idx, model):
        return DenseStore()


@torch.no_grad()
def test_prompt_compression_prefills_the_shorter_prompt_and_counts_against_the_original():
    model, ctx, qst = tiny_llama(), ids(40), ids(6, seed=1)
    cache = KVCache(model, EveryOther())
    short, cache.elided = shorten_prompt(cache.method, ctx, qst, False, cache.model_info)
    assert short.shape == (1, 20) and cache.elided == 20
    gen = greedy_generate(model, cache, [short, qst], 3)
    full = greedy_generate(model, KVCache(model, Full()), [ctx, qst], 3)
    assert gen.full_kv_bytes == full.full_kv_bytes  # ratios count against the original prompt's full cache
    assert gen.kv_bytes == 2 * 2 * 2 * 20 * 16 * 4  # layers x K,V x heads x 20 kept tokens x D x fp32
    assert gen.full_kv_bytes == 2 * 2 * 2 * 40 * 16 * 2  # ... against 40 prompt tokens in the 16-bit unit
    rec = record_prefill(model, short)
    replayed = cache_from_record(model, EveryOther(), rec, elided=20)
    assert replayed.full_nbytes() == 2 * 2 * 2 * 40 * 16 * 4  # layers x K,V x heads x 40 tokens x D x fp32


def test_a_prompt_transform_must_return_a_shorter_id_tensor():
    @dataclass
    class Longer(EveryOther):
        def compress_prompt(self, context, question, model):
            return torch.cat([context, context], dim=1)

    with pytest.raises(ValueError, match=r"Longer.compress_prompt must return token ids of shape \(1, n'\)"):
        shorten_prompt(Longer(), ids(10), ids(3), True, Model())


class BiasedStore(DenseStore):
    """Toy: key 0 stands for 3 tokens (log 3 added to its logits), as a merged or compensation token would."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def logit_bias(self):
        b = torch.zeros(self.k.shape[:3])
        b[:, :, 0] = torch.log(torch.tensor(3.0))
        return b

    def after_attention(self, step):
        self.steps.append(step)


@dataclass
class Biased(KVMethod):
    def new_layer(self, layer_idx, model):
        return BiasedStore()


@torch.no_grad()
def test_a_logit_bias_weighs_a_key_as_that_many_copies():
    """Reference: plain softmax attention where key 0 (and its value) is repeated 3 times, no bias."""
    model, x = tiny_llama(), ids(20)
    cache = KVCache(model, Biased())
    out = model(x, cache=cache).logits
    model(out[:, -1:].argmax(-1), cache=cache)
    step = cache.layers[1].store.steps[-1]  # the decoding step of layer 1
    k3 = torch.cat([step.keys[:, :, :1], step.keys[:, :, :1], step.keys], dim=2)
    G = step.queries.shape[1] // k3.shape[1]
    logits = torch.einsum("bhqd,bhtd->bhqt", step.queries, k3.repeat_interleave(G, 1)) * step.scaling
    ref = torch.softmax(logits, -1)
    ref = torch.cat([ref[..., :3].sum(-1, keepdim=True), ref[..., 3:]], dim=-1)
    assert torch.allclose(step.probs(), ref, atol=1e-5)
    full = model(x).logits
    assert not torch.allclose(out, full, atol=1e-3)  # the bias changed the prompt's attention too


def zero_head_0_of_decoding(out):
    """Toy `mix`: while decoding (one query), query head 0's attention output becomes 0 (out (B, H, q, D))."""
    if out.shape[2] > 1:
        return out  # the prompt's output unchanged, as SparQ (which reads everything while prefilling)
    out = out.clone()
    out[:, 0] = 0
    return out


class ZeroHeadStore(DenseStore):
    def mix(self, step, out):
        assert out.shape == step.queries.shape  # (B, H, q, D), as the queries
        return zero_head_0_of_decoding(out)


@dataclass
class ZeroHead(KVMethod):
    def new_layer(self, layer_idx, model):
        return ZeroHeadStore()


class ZeroHeadEvictingStore(EvictingStore):
    def mix(self, step, out):
        return zero_head_0_of_decoding(out)


@dataclass
class Recent(EvictionMethod):
    """Toy eviction (the latest tokens); `mixes` gives its stores the toy `mix`."""

    mixes: bool = False

    def score(self, step, history, budget):
        return step.positions.float()

    def new_layer(self, layer_idx, model):
        return (ZeroHeadEvictingStore if self.mixes else EvictingStore)(self, layer_idx, model)


def zero_head_0_after(model, start=None):
    """Reference: hooks on every o_proj zeroing query head 0's input features at sequence positions >= start of
    a forward pass (start None: in one-token passes only, i.e. while decoding with a cache)."""
    D = model.config.head_dim

    def hook(module, args):
        x = args[0].clone()
        if start is not None or x.shape[1] == 1:
            x[:, start or 0:, :D] = 0  # o_proj's input is (B, q, H D), head after head
        return (x,)
    return [layer.self_attn.o_proj.register_forward_pre_hook(hook) for layer in model.model.layers]


@torch.no_grad()
def test_mix_changes_the_attention_output_before_the_output_projection():
    model, x, steps = tiny_llama(), ids(25), 3
    cache = KVCache(model, ZeroHead())
    logits = model(x, cache=cache).logits[:, -1]
    assert torch.allclose(logits, model(x).logits[:, -1], atol=1e-5)  # the prompt's output unchanged
    seq = x
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        logits = model(tok, cache=cache).logits[:, -1]
        hooks = zero_head_0_after(model, 25)
        ref = model(seq).logits[:, -1]  # a plain forward with head 0 zeroed on the decoded positions
        for h in hooks:
            h.remove()
        assert torch.allclose(logits, ref, atol=1e-5)
        assert not torch.allclose(logits, model(seq).logits[:, -1], atol=1e-3)  # the toy did change something
    # a replayed prefill decodes through mix too
    rec = record_prefill(model, x)
    live = greedy_generate(model, KVCache(model, ZeroHead()), [x], 5)
    replayed = greedy_generate(model, cache_from_record(model, ZeroHead(), rec), [], 5, logits=rec.logits)
    assert live.tokens == replayed.tokens


@torch.no_grad()
def test_compose_forwards_mix_from_its_eviction_store():
    model, x = tiny_llama(), ids(40)
    quant = lambda: KIVI(bits=8, group_size=8, residual_length=8)  # noqa: E731

    def decode(method, steps=3):
        cache = KVCache(model, method)
        out = [model(x, cache=cache).logits[:, -1]]
        for t in range(steps):
            out.append(model(torch.tensor([[7 + t]]), cache=cache).logits[:, -1])
        return cache, torch.cat(out)

    cache, ours = decode(Compose(Recent(budget=30, mixes=True), quant()))
    out = torch.randn(1, 4, 1, 16)
    assert torch.equal(cache.layers[0].store.mix(None, out), zero_head_0_of_decoding(out))
    plain = decode(Compose(Recent(budget=30), quant()))[1]
    hooks = zero_head_0_after(model)
    ref = decode(Compose(Recent(budget=30), quant()))[1]  # the same cache, head 0 zeroed by the hooks instead
    for h in hooks:
        h.remove()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours[0], plain[0]) and not torch.allclose(ours[1:], plain[1:], atol=1e-3)
