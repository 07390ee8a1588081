"""Our eviction methods against NVIDIA kvpress 0.5.5, from recorded fixtures (kvpress pins transformers < 5.3).

`fixtures/make_kvpress_fixtures.py` ran kvpress 0.5.5 with transformers 5.2.0 in a separate environment on a
random 2-layer GQA Llama (4 query heads, 2 KV heads) and a 60-token prompt, and saved the weights, the prompt
and, per press and compression ratio, the token indices kvpress kept per layer and KV head plus the scores it
ranked them by. Here the same weights run in transformers 5.24 through `KVCache`, and for every method:

* same rule, same convention -> the kept indices are asserted equal (StreamingLLM, KNorm, KeyDiff, SnapKV,
  Ada-KV over SnapKV and over KNorm);
* documented deviation -> ours is configured to kvpress's convention where a knob exists, and the documented
  relation between the two kept sets is asserted exactly otherwise (TOVA, H2O vs ObservedAttention,
  PyramidKV), each comment naming the docstring's Deviations item;
* Random: different random streams by design; only the counts can agree.

kvpress's compression_ratio r is the fraction removed; our ratio is tokens seen / tokens kept = 1 / (1 - r).
"""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reference_impls import Full, KVCache
from reference_impls.base import attention_probs
from reference_impls.eviction.policies import Adaptive
from reference_impls.eviction.h2o import H2O, h2o_accumulate
from reference_impls.eviction.keydiff import KeyDiff, keydiff_scores
from reference_impls.eviction.knorm import KNorm, knorm_scores
from reference_impls.eviction.pyramidkv import PyramidKV
from reference_impls.eviction.random import RandomEviction
from reference_impls.eviction.snapkv import SnapKV, snapkv_scores
from reference_impls.eviction.streamingllm import StreamingLLM
from reference_impls.eviction.tova import TOVA, tova_scores
from reference_impls.replay import record_prefill

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress_0.5.5.pt"
DATA = torch.load(FIXTURE, weights_only=True)
IDS = DATA["input_ids"]  # (1, 60), distinct tokens
T = IDS.shape[1]
WINDOW = 8  # SnapKV/PyramidKV window the fixture used (kvpress's default 64 needs a longer prompt)
RATIOS = (0.5, 0.75)


@pytest.fixture(scope="module")
def model():
    m = LlamaForCausalLM(LlamaConfig(**DATA["config"])).float().eval()
    m.load_state_dict(DATA["state_dict"], strict=True)
    return m


@pytest.fixture(scope="module")
def record(model):
    """Queries, post-RoPE keys and scaling per layer of our uncompressed prefill."""
    return record_prefill(model, IDS)


def kvpress_run(name, r):
    run = DATA["runs"][f"{name}@{r}"]
    assert run["compression_ratio"] == r
    return run


@torch.no_grad()
def ours_kept(model, method):
    """Per layer, (1, H_kv, K) stream indices our cache holds after the prefill (ascending, -1 = empty slot)."""
    cache = KVCache(model, method)
    model(IDS, cache=cache)
    kept = [layer.store.kept_slots() for layer in cache.layers]
    assert all(k is not None for k in kept), "the method dropped nothing"
    return kept


def topk_sorted(scores, k):
    return scores.topk(k, dim=-1).indices.sort(-1).values


def test_fixture_is_small_and_names_its_versions():
    assert FIXTURE.stat().st_size < 1_000_000
    assert DATA["versions"]["kvpress"] == "0.5.5"
    assert DATA["versions"]["transformers"].startswith("5.2")


@torch.no_grad()
def test_both_environments_feed_the_scorers_the_same_model(model, record):
    """Same weights, same logits, same post-RoPE keys: any later disagreement is the methods', not the inputs'."""
    logits = model(IDS, cache=KVCache(model, Full())).logits
    assert torch.allclose(logits, DATA["logits"], atol=1e-5, rtol=0)
    for ours, theirs in zip(record.keys, DATA["keys"]):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Same rule, same convention: kept indices equal
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", RATIOS)
def test_streamingllm_keeps_what_streamingllmpress_keeps(model, r):
    ours = ours_kept(model, StreamingLLM(ratio=1 / (1 - r), n_sink=4))
    for layer, (o, k) in enumerate(zip(ours, kvpress_run("StreamingLLMPress", r)["kept"])):
        assert torch.equal(o, k), layer


@pytest.mark.parametrize("r", RATIOS)
def test_knorm_keeps_what_knormpress_keeps(model, record, r):
    run = kvpress_run("KnormPress", r)
    for layer, k in enumerate(record.keys):
        assert torch.allclose(knorm_scores(k), run["scores"][layer], atol=1e-5, rtol=1e-5)
    for layer, (o, k) in enumerate(zip(ours_kept(model, KNorm(ratio=1 / (1 - r))), run["kept"])):
        assert torch.equal(o, k), layer


@pytest.mark.parametrize("r", RATIOS)
def test_keydiff_keeps_what_keydiffpress_keeps(model, record, r):
    run = kvpress_run("KeyDiffPress", r)
    for layer, k in enumerate(record.keys):
        assert torch.allclose(keydiff_scores(k), run["scores"][layer], atol=1e-6, rtol=1e-5)
    for layer, (o, k) in enumerate(zip(ours_kept(model, KeyDiff(ratio=1 / (1 - r))), run["kept"])):
        assert torch.equal(o, k), layer


@pytest.mark.parametrize("r", RATIOS)
def test_snapkv_keeps_what_snapkvpress_keeps(model, record, r):
    """kvpress rebuilds the window queries from hidden states (q_proj + RoPE) and averages them; we take the
    queries attention used and sum them (Deviations (4)): the prefix scores differ by the factor w only."""
    run = kvpress_run("SnapKVPress", r)
    P = T - WINDOW
    for layer, (q, k) in enumerate(zip(record.queries, record.keys)):
        ours = snapkv_scores(q[:, :, -WINDOW:], k, record.scaling, kernel_size=5)
        assert torch.allclose(ours[..., :P] / WINDOW, run["scores"][layer][..., :P], atol=1e-6, rtol=1e-4)
    method = SnapKV(ratio=1 / (1 - r), window=WINDOW, kernel_size=5)
    for layer, (o, k) in enumerate(zip(ours_kept(model, method), run["kept"])):
        assert torch.equal(o, k), layer
        assert set(range(P, T)) <= set(o[0, 0].tolist())  # the window is kept by both


@pytest.mark.parametrize("r", RATIOS)
def test_adakv_over_snapkv_keeps_what_adakvpress_keeps(model, r):
    """Same safeguard (each head's top floor(0.2 n_kept) first) and the same layer-wide cut: per-head sets equal,
    so the uneven per-head counts are equal too. kvpress masks evicted keys instead of dropping them."""
    run = kvpress_run("AdaKVPress(SnapKVPress)", r)
    method = SnapKV(ratio=1 / (1 - r), window=WINDOW, kernel_size=5, heads=Adaptive(alpha=0.2, rule="kvpress"))
    for layer, (o, k) in enumerate(zip(ours_kept(model, method), run["kept"])):
        assert torch.equal(o, k), layer
    counts = [(k >= 0).sum(-1) for k in run["kept"]]
    assert any(bool((c[0] != c[0, 0]).any()) for c in counts), "the fixture should exercise uneven head budgets"


@pytest.mark.parametrize("r", RATIOS)
def test_adakv_safeguard_matches_adakvpress_where_it_binds(model, r):
    """Over KNorm (no forced window) with alpha = 0.9 the safeguard decides: on this prompt a head keeps exactly
    floor(0.9 n_kept) tokens, fewer than the layer-wide top-k alone would give it."""
    run = kvpress_run("AdaKVPress(KnormPress)", r)
    assert "alpha_safeguard=0.9" in run["press"]
    n_safe = int(0.9 * round(T * (1 - r)))
    ours = ours_kept(model, KNorm(ratio=1 / (1 - r), heads=Adaptive(alpha=0.9, rule="kvpress")))
    for layer, (o, k) in enumerate(zip(ours, run["kept"])):
        assert torch.equal(o, k), layer
    assert any(bool(((k >= 0).sum(-1) == n_safe).any()) for k in run["kept"]), "the safeguard should bind"


# ------------------------------------------------------------------------------------------------------------
# Documented deviations: the exact relation between the two kept sets
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", RATIOS)
def test_tova_differs_from_tovapress_only_in_forcing_the_last_token(model, record, r):
    """tova.py Deviations (4): TOVAPress always keeps the current (last) token; we let it compete on its score.
    The scores of the other T - 1 keys agree, so ours = top-n of (kvpress's scores, our score for the last key)."""
    run = kvpress_run("TOVAPress", r)
    n = round(T * (1 - r))
    ours = ours_kept(model, TOVA(ratio=1 / (1 - r)))
    dropped_last = 0  # layers where the deviation shows
    for layer, (q, k) in enumerate(zip(record.queries, record.keys)):
        s = tova_scores(q[:, :, -1:], k, record.scaling)
        theirs = run["scores"][layer]
        assert torch.allclose(s[..., :-1], theirs[..., :-1], atol=1e-6, rtol=1e-4)
        assert bool((run["kept"][layer] == T - 1).any(-1).all())  # kvpress: always kept
        expected = topk_sorted(torch.cat([theirs[..., :-1], s[..., -1:]], -1), n)
        assert torch.equal(ours[layer], expected), layer
        if not bool((ours[layer] == T - 1).any()):
            dropped_last += 1  # ours then keeps one more old token instead: the sets differ by exactly one
            assert len(set(ours[layer][0, 0].tolist()) - set(run["kept"][layer][0, 0].tolist())) == 1
        else:
            assert torch.equal(ours[layer], run["kept"][layer]), layer
    assert dropped_last > 0  # on this random model the last token draws little attention: the relation is exercised


@pytest.mark.parametrize("r", RATIOS)
def test_h2o_ranks_by_observedattentionpress_scores_times_the_queries_that_saw_each_key(model, record, r):
    """h2o.py Deviations (4): ObservedAttentionPress divides the attention a key received at the prefill by the
    T - j queries that saw it, and keeps no recent window. Ours sums it (Alg. 1). With heavy_fraction=1 (no
    window) our kept set is the top-n of kvpress's score times T - j; with the default 0.5 it is the recent
    n - round(n / 2) plus that top among the rest."""
    run = kvpress_run("ObservedAttentionPress", r)
    n = round(T * (1 - r))
    seen_by = torch.arange(T, 0, -1, dtype=torch.float32)  # key j is seen by queries j .. T - 1
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(1, 2, T, T)
    unnormalised = [s * seen_by for s in run["scores"]]
    for layer, (q, k) in enumerate(zip(record.queries, record.keys)):
        acc = h2o_accumulate(None, attention_probs(q, k, causal, record.scaling), k.shape[1])
        assert torch.allclose(acc, unnormalised[layer], atol=1e-5, rtol=1e-4)
    heavy_only = ours_kept(model, H2O(ratio=1 / (1 - r), heavy_fraction=1.0))
    split = ours_kept(model, H2O(ratio=1 / (1 - r)))
    n_recent = n - round(n * 0.5)
    for layer in range(len(heavy_only)):
        assert torch.equal(heavy_only[layer], topk_sorted(unnormalised[layer], n)), layer
        old = unnormalised[layer].clone()
        old[..., T - n_recent:] = float("-inf")
        expected = torch.cat([topk_sorted(old, n - n_recent), torch.arange(T - n_recent, T).expand(1, 2, -1)], -1)
        assert torch.equal(split[layer], expected), layer
        # the division by T - j matters: on this prompt kvpress keeps a different set than our heavy-hitter rule
    assert any(not torch.equal(o, k) for o, k in zip(heavy_only, run["kept"]))


@pytest.mark.parametrize("r", RATIOS)
def test_pyramidkv_spreads_the_same_total_differently_over_the_same_snapkv_ranking(model, r):
    """pyramidkv.py Deviations (2): we reserve the window in every layer on top of its pyramid share; kvpress
    spreads n(1 - r) with no reservation (and falls back to uniform budgets when its top layer's share would be
    below the window). Both rank inside a layer by SnapKV, so: (a) the totals over layers agree; (b) our SnapKV
    with kvpress's per-layer count keeps exactly kvpress's set; (c) in each layer the smaller set is inside the
    larger one."""
    run = kvpress_run("PyramidKVPress", r)
    theirs = run["kept"]
    ours = ours_kept(model, PyramidKV(ratio=1 / (1 - r), window=WINDOW, kernel_size=5))
    assert sum(o.shape[-1] for o in ours) == sum(k.shape[-1] for k in theirs) == 2 * round(T * (1 - r))
    assert ours[-1].shape[-1] >= WINDOW  # the reservation: our top layer keeps at least the window
    for layer, (o, k) in enumerate(zip(ours, theirs)):
        same_count = ours_kept(model, SnapKV(budget=k.shape[-1], window=WINDOW, kernel_size=5))[layer]
        assert torch.equal(same_count, k), layer
        small, large = sorted((o, k), key=lambda x: x.shape[-1])
        for h in range(o.shape[1]):
            assert set(small[0, h].tolist()) <= set(large[0, h].tolist()), (layer, h)
    counts_ours = [o.shape[-1] for o in ours]
    counts_theirs = [k.shape[-1] for k in theirs]
    assert counts_ours != counts_theirs  # the reservation shows on this prompt: the budgets really differ


@pytest.mark.parametrize("r", RATIOS)
def test_random_keeps_as_many_tokens_as_randompress(model, r):
    """random.py Deviations: our scores are a fixed function of (seed, layer, head, position); kvpress draws
    torch.rand per call (with a seed, from a generator re-seeded on every call, so every layer keeps the same
    positions). The random streams differ by design: only the kept counts can agree."""
    theirs = kvpress_run("RandomPress", r)["kept"]
    ours = ours_kept(model, RandomEviction(ratio=1 / (1 - r), seed=0))
    for o, k in zip(ours, theirs):
        assert o.shape == k.shape
    assert all(torch.equal(k, theirs[0]) for k in theirs)  # the re-seeded generator: one set for every layer
    assert not torch.equal(ours[0], ours[1])  # ours draws per layer
