"""Random eviction baseline: seeded, repeatable, uniform over positions."""

import pytest
import torch

from reference_impls.eviction.random import RandomEviction, random_scores
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, generation_equals_attention_over_kept,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one)


def test_scores_are_a_fixed_table_indexed_by_head_and_position():
    pos = torch.tensor([[[0, 1, 2, -1], [3, 2, 1, 0]], [[2, 0, -1, -1], [0, 1, 2, 3]]])
    s = random_scores(pos, seed=7, layer_idx=2)
    for b in range(2):
        for h in range(2):
            for t in range(4):
                p = pos[b, h, t].item()
                if p < 0:
                    assert s[b, h, t] == float("-inf")
                else:  # the same (head, position) always draws the same number, whatever the row
                    same = [(bb, tt) for bb in range(2) for tt in range(4) if pos[bb, h, tt] == p]
                    assert all(s[bb, h, tt] == s[b, h, t] for bb, tt in same)
                    assert 0 <= s[b, h, t] < 1


def test_same_seed_same_tokens_other_seed_other_tokens(tiny):
    def kept(seed):
        c = kept_counts_equal_budget(tiny, RandomEviction(budget=12, seed=seed), budget=12)
        return [layer.store.kept_slots() for layer in c.layers]
    a, b, c = kept(0), kept(0), kept(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_kept_positions_are_roughly_uniform():
    pos = torch.arange(1000).expand(1, 64, 1000)
    top = random_scores(pos, seed=3, layer_idx=0).topk(250).indices.float()
    assert abs(top.mean().item() - 499.5) < 15  # 16000 draws: standard error ~2.3


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, RandomEviction(budget=budget))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, RandomEviction(ratio=2, seed=5))


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    generation_equals_attention_over_kept(tiny_llama, RandomEviction(budget=12, seed=2))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="seed"):
        RandomEviction(seed=-1)
    with pytest.raises(ValueError, match="budget"):
        RandomEviction(budget=0)
    with pytest.raises(ValueError, match="ratio"):
        RandomEviction.from_ratio(0.5)
