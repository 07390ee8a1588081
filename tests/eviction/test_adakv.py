"""Ada-KV (arXiv 2407.11550): layer-wide top-k across heads with a per-head safeguard, as a wrapper."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import AdaKV, SnapKV
from reference_impls.eviction.adakv import adakv_counts
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one)


def naive_counts(scores, b, alpha):
    """Plain rule: every head's best floor(alpha b) are kept; the rest of H b goes to the best remaining scores."""
    H, T = scores.shape
    safe = int(alpha * b)
    keep = {(h, t) for h in range(H) for t in scores[h].argsort(descending=True)[:safe].tolist()}
    rest = sorted(((scores[h, t].item(), h, t) for h in range(H) for t in range(T) if (h, t) not in keep),
                  reverse=True)
    keep |= {(h, t) for _, h, t in rest[:H * b - len(keep)]}
    return [sum(1 for hh, _ in keep if hh == h) for h in range(H)]


@pytest.mark.parametrize("alpha,b", [(0.2, 10), (0.0, 7), (1.0, 5), (0.5, 13)])
def test_counts_equal_the_plain_rule(alpha, b):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 4, 40, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5])[None, :, None]
    got = adakv_counts(scores, torch.full((3,), b), alpha)
    for row in range(3):
        assert got[row].tolist() == naive_counts(scores[row], b, alpha)
        assert int(got[row].sum()) == 4 * b and int(got[row].min()) >= int(alpha * b)


@torch.no_grad()
def test_layer_total_is_uniform_heads_differ_and_varlen_bytes_count_only_kept_tokens():
    model, T = tiny_llama(num_kv_heads=4, num_heads=8), 60
    cache = KVCache(model, AdaKV(budget=12, scorer=SnapKV(window=4), alpha=0.25))
    model(ids(T), cache=cache)
    for layer in cache.layers:
        s = layer.store.kept_slots()
        per_head = (s >= 0).sum(-1)[0]
        assert int(per_head.sum()) == 4 * 12 and int(per_head.min()) >= 4  # window (4) + safeguard (3) overlap
        assert (s[0, :, :][s[0] >= T - 4].numel()) == 4 * 4  # every head keeps the window
        D = layer.store.k.shape[-1]
        assert int(per_head.max()) > int(per_head.min())  # heads differ, so the store holds them flat
        # only the kept tokens (keys, values fp32 + int32 slot each) and one int32 count per head
        assert layer.store.nbytes() == 4 * 12 * (2 * D * 4 + 4) + 4 * 4


def test_generation_after_eviction_equals_attention_over_each_heads_kept_tokens():
    decode_matches_reference(tiny_llama(), AdaKV(budget=14, scorer=SnapKV(window=4)))


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, AdaKV(budget=40), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, AdaKV(ratio=2, scorer=SnapKV(window=4)), steps=2, ragged=True)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        AdaKV(alpha=1.5)
    with pytest.raises(ValueError, match="scorer"):
        AdaKV(scorer=None)
    with pytest.raises(ValueError, match="ratio"):
        AdaKV.from_ratio(0.5)
