"""Ada-KV (arXiv 2407.11550): layer-wide top-k across heads with a per-head safeguard, as a head policy."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import AdaKV, KNorm
from reference_impls.eviction.policies import Adaptive, adakv_counts
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one)


def naive_counts(scores, b, alpha, safe=None):
    """Plain rule: every head's best `safe` (kvpress: floor(alpha b)) are kept; the rest of H b goes to the best
    remaining scores."""
    H, T = scores.shape
    safe = int(alpha * b) if safe is None else safe
    keep = {(h, t) for h in range(H) for t in scores[h].argsort(descending=True)[:safe].tolist()}
    rest = sorted(((scores[h, t].item(), h, t) for h in range(H) for t in range(T) if (h, t) not in keep),
                  reverse=True)
    keep |= {(h, t) for _, h, t in rest[:H * b - len(keep)]}
    return [sum(1 for hh, _ in keep if hh == h) for h in range(H)]


@pytest.mark.parametrize("alpha,b", [(0.2, 10), (0.0, 7), (1.0, 5), (0.5, 13)])
def test_counts_equal_the_plain_rule(alpha, b):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 4, 40, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5])[None, :, None]
    got = adakv_counts(scores, torch.full((3,), b), alpha, rule="kvpress")
    for row in range(3):
        assert got[row].tolist() == naive_counts(scores[row], b, alpha)
        assert int(got[row].sum()) == 4 * b and int(got[row].min()) >= int(alpha * b)


@pytest.mark.parametrize("alpha,b,w", [(0.2, 10, 4), (0.2, 12, 8), (0.5, 13, 2), (0.2, 6, 8)])
def test_official_rule_protects_the_window_plus_alpha_of_the_rest(alpha, b, w):
    """The Ada-KV code: every head keeps its window and floor(alpha (b - w)) prefix tokens, then the layer's best."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 4, 40, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5])[None, :, None]
    scores[..., -w:] = 100 + torch.arange(w)  # the scorer ranks its window first (as SnapKV does)
    got = adakv_counts(scores, torch.full((2,), b), alpha, window=w, rule="official")
    safe = min(w + int(alpha * max(b - w, 0)), b)
    for row in range(2):
        assert got[row].tolist() == naive_counts(scores[row], b, alpha, safe=safe)
        assert int(got[row].min()) >= safe
    # the kvpress rule protects no prefix token at b = 12, w = 8 (floor(0.2 * 12) = 2 < 8); the official one does
    assert safe > int(alpha * b) or w == 2

@torch.no_grad()
def test_layer_total_is_uniform_heads_differ_and_varlen_bytes_count_only_kept_tokens():
    model, T = tiny_llama(num_kv_heads=4, num_heads=8), 60
    cache = KVCache(model, AdaKV(budget=12, window=4, heads=Adaptive(alpha=0.25)))
    model(ids(T), cache=cache)
    for layer in cache.layers:
        s = layer.store.kept_slots()
        per_head = (s >= 0).sum(-1)[0]
        assert int(per_head.sum()) == 4 * 12 and int(per_head.min()) >= 4 + 2  # window (4) + floor(0.25 (12 - 4))
        assert (s[0, :, :][s[0] >= T - 4].numel()) == 4 * 4  # every head keeps the window
        D = layer.store.k.shape[-1]
        assert int(per_head.max()) > int(per_head.min())  # heads differ, so the store holds them flat
        # only the kept tokens (keys, values fp32 + int32 slot each) and one int32 count per head
        assert layer.store.nbytes() == 4 * 12 * (2 * D * 4 + 4) + 4 * 4


def test_generation_after_eviction_equals_attention_over_each_heads_kept_tokens():
    decode_matches_reference(tiny_llama(), AdaKV(budget=14, window=4))


def test_any_scorer_takes_the_adaptive_policy_and_the_pyramid_at_once():
    model, T = tiny_llama(num_kv_heads=4, num_heads=8, num_layers=4), 80
    with torch.no_grad():
        cache = KVCache(model, KNorm(ratio=4, heads="adaptive", layers="pyramid"))
        model(ids(T), cache=cache)
    totals = [int((layer.store.kept_slots() >= 0).sum()) for layer in cache.layers]
    assert sum(totals) == 4 * 4 * 20 and totals[0] > totals[-1]  # pyramid over layers, uniform total
    assert any(len(set((layer.store.kept_slots()[0] >= 0).sum(-1).tolist())) > 1 for layer in cache.layers)


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, AdaKV(budget=40), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, AdaKV(ratio=2, window=4), steps=2, ragged=True)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        Adaptive(alpha=1.5)
    with pytest.raises(ValueError, match="heads must be one of uniform, adaptive, threshold"):
        AdaKV(heads="pyramid")
    with pytest.raises(ValueError, match="ratio"):
        AdaKV.from_ratio(0.5)
