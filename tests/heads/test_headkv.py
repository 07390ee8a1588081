"""HeadKV (arXiv 2410.19258): the R2 importance score, the per-head budgets of the paper's allocation, and SnapKV
selection inside each head, against loops and the formula written out."""

import math

import pytest
import torch

from reference_impls import KVCache, SnapKV, make_method
from reference_impls.generation import greedy_generate
from reference_impls.eviction.snapkv import snapkv_scores
from reference_impls.heads.headkv import HeadKV, headkv_budgets, headkv_scores
from reference_impls.integration import model_info
from reference_impls.models import tiny_llama

from evict_checks import budget_at_least_length_is_full, decode_matches_reference, ids, spy


def test_r2_score_equals_a_loop_over_the_top_keys():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 30, generator=g) * 3, -1)
    needle = torch.zeros(30, dtype=torch.bool)
    needle[[4, 5, 6, 20]] = True
    got = headkv_scores(probs, needle)
    for h in range(3):
        top = sorted(range(30), key=lambda j: -float(probs[h, j]))[:4]  # k = the needle's length
        assert abs(float(got[h]) - sum(float(probs[h, j]) for j in top if needle[j]) / 4) < 1e-6


def paper_budgets(shares, B, beta):
    """B_{l,h} = (B - floor(B / beta)) + s_{l,h} floor(B / beta) L H, head by head (official floors B / beta)."""
    pool = math.floor(B / beta)
    return [(B - pool) + float(s) * pool * len(shares) for s in shares]


@pytest.mark.parametrize("B,beta", [(40, 1.5), (17, 1.01), (100, 5.0)])
def test_budgets_are_the_papers_allocation_rounded_to_the_exact_total(B, beta):
    s = torch.rand(12, generator=torch.Generator().manual_seed(B))
    s = s / s.sum()
    got = headkv_budgets(s, B, beta, cap=10_000)
    ref = paper_budgets(s, B, beta)
    assert all(abs(g - r) < 1 for g, r in zip(got.tolist(), ref))
    assert int(got.sum()) == 12 * B


def test_a_head_never_keeps_more_than_the_prompt_and_its_excess_goes_to_the_others():
    s = torch.tensor([0.7, 0.2, 0.1, 0.0])
    got = headkv_budgets(s, 30, 1.5, cap=50)  # head 0 would get 10 + 0.7 * 80 = 66
    assert got.tolist()[0] == 50 and int(got.sum()) == 4 * 30
    extra = [g - 10 for g in got.tolist()[1:]]  # beyond the base share B - floor(B / beta) = 10
    assert extra[2] == 0 and abs(extra[0] / extra[1] - 2) < 0.2  # in proportion to the scores 0.2 : 0.1
    assert headkv_budgets(s, 80, 1.5, cap=50).tolist() == [50] * 4  # every head capped: the whole prompt


@torch.no_grad()
def test_each_head_keeps_its_budget_and_the_model_keeps_the_uniform_total():
    """Counts = window + the paper's allocation (B = budget - window); kept tokens = the window + the head's top
    SnapKV votes (max pooling, kernel 7, mean over the GQA group)."""
    model, T, budget, window = tiny_llama(), 80, 24, 8
    scores = [[4.0, 1.0], [0.0, 3.0]]
    cache = KVCache(model, HeadKV(budget=budget, head_scores=scores))
    log = spy(cache)
    model(ids(T, seed=2), cache=cache)
    s = torch.tensor(scores).flatten() / 8.0
    ref = [round(r) for r in paper_budgets(s, budget - window, 1.5)]  # exact halves do not occur here
    held = 0
    for l, layer in enumerate(cache.layers):
        kept = layer.store.kept_slots()
        e = log[l][0]
        votes = snapkv_scores(e["q"][:, :, -window:], e["k"], e["scaling"], kernel_size=7, pooling="max")
        for h in range(2):
            slots = [j for j in kept[0, h].tolist() if j >= 0]
            assert len(slots) == ref[2 * l + h] + window, (l, h)
            assert slots[-window:] == list(range(T - window, T)), (l, h)
            prefix = votes[0, h, :T - window]  # max pooling ties neighbours: compare the votes, not the indices
            chosen = torch.zeros(T - window, dtype=torch.bool)
            chosen[slots[:-window]] = True
            assert prefix[chosen].min() >= prefix[~chosen].max(), (l, h)
            held += len(slots)
    assert held == 4 * budget


@torch.no_grad()
def test_uniform_heads_make_it_snapkv_and_a_budget_above_the_prompt_is_full(tiny):
    x = ids(60, seed=3)
    a, b = KVCache(tiny, HeadKV(ratio=3, heads="uniform")), KVCache(tiny, SnapKV(ratio=3, preset="paper", window=8))
    tiny(x, cache=a)
    tiny(x, cache=b)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.store.kept_slots(), lb.store.kept_slots())
    budget_at_least_length_is_full(tiny, HeadKV(budget=60, head_scores=[[1, 2], [3, 4]]), same_bytes=True)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    decode_matches_reference(tiny_llama(), HeadKV(budget=20, head_scores=[[5, 1], [0, 2]]))


@torch.no_grad()
def test_without_a_tokenizer_no_needle_is_found_and_every_head_scores_the_same(tiny):
    shares = HeadKV(calib_tokens=64).shares(model_info(tiny))
    assert torch.allclose(shares, torch.full((2, 2), 0.25, dtype=torch.float64))
    gen = greedy_generate(tiny, KVCache(tiny, make_method("headkv", 4)), [ids(150)], 4)
    assert len(gen.tokens) == 4 and gen.kv_bytes < 2 * gen.full_kv_bytes  # fp32 held, 16-bit full


def test_bad_parameters_are_rejected(tiny):
    for kw, name in ((dict(beta=1.0), "beta"), (dict(calib_tokens=4), "calib_tokens"),
                     (dict(head_scores=[[1, -1]]), "head_scores"), (dict(head_scores=[1, 2]), "head_scores"),
                     (dict(heads="pyramid"), "heads"), (dict(window=0), "window")):
        with pytest.raises(ValueError, match=name):
            HeadKV(**kw)
    with pytest.raises(ValueError, match="layers"):
        KVCache(tiny, HeadKV(head_scores=[[1, 2]]))
    with pytest.raises(ValueError, match="KV heads"):
        tiny(ids(40), cache=KVCache(tiny, HeadKV(budget=20, head_scores=[[1, 2, 3], [1, 2, 3]])))


@pytest.mark.slow
def test_the_passkey_digits_are_the_needle_and_few_heads_retrieve_on_the_embedded_model(smollm):
    from reference_impls.heads.headkv import passkey_positions

    model, tok = smollm
    needle = passkey_positions(tok, 1024, model_info(model, tok).calibration("passkey", 1024)[0].keys.shape[2])
    assert needle is not None and int(needle.sum()) == 10  # a 5-digit passkey, stated twice
    shares = HeadKV().shares(model_info(model, tok))
    assert abs(float(shares.sum()) - 1) < 1e-9 and 0 < int((shares > 0.01).sum()) < shares.numel() // 2
