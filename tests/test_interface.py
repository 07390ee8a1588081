"""Interface v2: every implemented method and every eviction x quantizer composition runs through `make_method` and
generation on three architectures; budget policies compose with every scorer; method strings and presets."""

import dataclasses

import pytest
import torch

from reference_impls import Compose, Full, KVCache
from reference_impls.eviction import EvictionMethod, SnapKV
from reference_impls.eviction.policies import Adaptive, Pyramid, Threshold, Uniform, pyramid_budgets
from reference_impls.generation import greedy_generate
from reference_impls.methods import implemented_methods, make_method, method_class
from reference_impls.models import tiny_llama
from reference_impls.quantization import KIVI
from reference_impls.quantization.store import Quantizer
from reference_impls.retrieval import RetrievalMethod


def tiny_qwen3():
    """Qwen3: QK-norm, and here a single KV head (MQA)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, sliding_window=None)
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3, "mistral": tiny_mistral}
IDS = list(implemented_methods())
EVICT = [m for m in IDS if issubclass(method_class(m), EvictionMethod)]
QUANT = [m for m in IDS if issubclass(method_class(m), Quantizer)]


def prompt(n=150, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@torch.no_grad()
@pytest.mark.parametrize("mid", IDS)
def test_every_implemented_method_generates_on_every_architecture(model, mid):
    """A new method is covered the moment its entry names it: made from its id at 2x, it generates, and a
    prompt + question split (query-agnostic) works; bytes are measured (a quantizer configured for the embedded
    model's head dim 64 may hold more than this tiny model's full cache: QJL's sketch is sized for 64 channels)."""
    x, q = prompt(), prompt(5, seed=1)
    cache = KVCache(model, make_method(mid, 2))
    gen = greedy_generate(model, cache, [x, q], 4)
    assert len(gen.tokens) == 4 and 0 < gen.kv_bytes
    # full_kv_bytes counts a 16-bit cache (the seeds' unit); these tiny models hold fp32, twice that
    # retrieval methods hold the whole cache plus what selects from it (page bounds, a PCA basis): they save reads
    assert gen.kv_bytes <= 2 * gen.full_kv_bytes or issubclass(method_class(mid), (Quantizer, RetrievalMethod))


@torch.no_grad()
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("evict", EVICT)
def test_every_eviction_method_composes_with_every_quantizer(evict, quant):
    model = tiny_llama()
    x = prompt(400)  # 200 kept tokens: more than KIVI's and QJL's full-precision windows (128)
    spec = f"{evict}:budget=200+{quant}"
    cache = KVCache(model, make_method(spec, 4))
    assert isinstance(cache.method, Compose)
    gen = greedy_generate(model, cache, [x], 4)
    alone = greedy_generate(model, KVCache(model, make_method(f"{evict}:budget=200")), [x], 4)
    assert len(gen.tokens) == 4 and gen.kv_bytes < alone.kv_bytes  # the kept tokens are stored packed


@torch.no_grad()
def test_composition_keeps_the_eviction_methods_tokens_and_its_ratio_is_the_product():
    model = tiny_llama(num_layers=3)
    x = prompt(400)
    snap = KVCache(model, SnapKV(ratio=2, window=16))
    model(x, cache=snap)
    kivi = KVCache(model, KIVI(bits=4, group_size=16, residual_length=32))
    model(x, cache=kivi)
    both = KVCache(model, Compose(SnapKV(ratio=2, window=16), KIVI(bits=4, group_size=16, residual_length=32)))
    model(x, cache=both)
    for a, b in zip(snap.layers, both.layers):
        assert torch.equal(a.store.kept_slots(), b.store.kept_slots())  # the same tokens kept
    r = lambda c: c.full_nbytes() / c.nbytes()  # noqa: E731
    # about the product: KIVI's full-precision window (32 tokens) weighs twice as much on the 200 kept tokens as on
    # 400, so the composition lands a little below it (5.6x against 1.94 x 3.39 = 6.6x here, 400 tokens)
    assert r(snap) * r(kivi) * 0.8 <= r(both) <= r(snap) * r(kivi) * 1.02, (r(snap), r(kivi), r(both))


@torch.no_grad()
@pytest.mark.parametrize("layers", [Uniform(), Pyramid(beta=4)])
@pytest.mark.parametrize("heads", [Uniform(), Adaptive(alpha=0.2), Adaptive(alpha=0.5, rule="kvpress")])
@pytest.mark.parametrize("mid", EVICT)
def test_every_scorer_takes_every_budget_policy_and_keeps_the_policys_counts(mid, layers, heads):
    model, T, ratio = tiny_llama(num_layers=4, num_heads=8, num_kv_heads=4), 96, 4
    method = dataclasses.replace(make_method(mid, ratio), ratio=ratio, budget=None, layers=layers, heads=heads)
    if mid == "fastgen":
        method = dataclasses.replace(method, recovery=None)
    cache = KVCache(model, method)
    model(prompt(T), cache=cache)
    b = round(T / ratio)
    expect = pyramid_budgets(torch.tensor([T]), torch.tensor([b]), 4, method.window, 4)[0] \
        if isinstance(layers, Pyramid) else torch.full((4,), b)
    for layer, budget in zip(cache.layers, expect.tolist()):
        per_head = (layer.store.kept_slots()[0] >= 0).sum(-1)
        assert int(per_head.sum()) == 4 * budget  # the layer's total is the policy's
        if type(heads) is Uniform:
            assert per_head.tolist() == [budget] * 4


def test_threshold_heads_keep_what_scores_above_it():
    scores = torch.tensor([[[0.1, 0.5, 0.9, 0.2], [0.6, 0.7, 0.8, 0.9]]])
    assert Threshold(0.5).head_counts(scores, torch.tensor([2]), 0).tolist() == [[2, 4]]


def test_method_strings_knobs_and_the_ratio():
    assert make_method("kivi:bits=4", 8).bits == 4  # a knob the string sets is not overridden by the ratio
    assert make_method("kivi", 8).bits < 4
    assert make_method("full", 4) == Full()
    s = make_method("snapkv:ratio=2,window=32,kernel_size=7,pooling=max,heads=adaptive", 8)
    assert (s.ratio, s.window, s.kernel_size, s.pooling, type(s.heads)) == (2, 32, 7, "max", Adaptive)
    c = make_method("snapkv:ratio=2+kivi", 8)
    assert isinstance(c, Compose) and c.evict.ratio == 2 and c.quant.nominal_ratio() > 3  # KIVI asked for ~4x
    c = make_method("kivi:bits=4+streamingllm", 4)  # either order
    assert isinstance(c.evict, EvictionMethod) and c.quant.bits == 4
    for spec, match in [("nope", "implemented methods: adakv"), ("snapkv:wind=3", "knobs: ratio, budget, layers"),
                        ("snapkv:window", "needs a value"), ("kivi+fp8", "evict must be an eviction method"),
                        ("snapkv:heads=pyramid", "heads must be one of uniform, adaptive, threshold"),
                        ("snapkv+kivi+fp8", "one eviction method \\+ one quantizer")]:
        with pytest.raises(ValueError, match=match):
            make_method(spec, 2)


def test_snapkv_presets_are_pinned_to_the_official_values():
    """kvpress SnapKVPress: window 64, kernel 5, avg; the official code's LongBench setting: window 32, kernel 7,
    max pooling (FasterDecoding/SnapKV snapkv_utils.py and its LongBench configs)."""
    k = SnapKV()
    assert (k.window, k.kernel_size, k.pooling) == (64, 5, "avg")
    p = SnapKV(preset="paper")
    assert (p.window, p.kernel_size, p.pooling) == (32, 7, "max")
    assert SnapKV(preset="paper", window=16).window == 16  # an explicit knob wins
    with pytest.raises(ValueError, match="preset must be one of kvpress, paper"):
        SnapKV(preset="longbench")


def test_a_new_scorer_gets_policies_composition_and_padding_for_free():
    """The CONTRIBUTING example: a 6-line scorer runs under a pyramid, adaptive heads and composed with KIVI."""

    @dataclasses.dataclass
    class LastTokens(EvictionMethod):
        def score(self, step, history, budget):
            return step.positions.float()  # keep the most recent tokens

    model, x = tiny_llama(), prompt(80)
    for method in (LastTokens(ratio=4, layers="pyramid", heads="adaptive"), Compose(LastTokens(ratio=2), KIVI(bits=4))):
        with torch.no_grad():
            gen = greedy_generate(model, KVCache(model, method), [x], 3)
        assert gen.kv_bytes < 2 * gen.full_kv_bytes  # the fp32 full cache is twice the 16-bit unit
