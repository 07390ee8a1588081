"""The token-merging hook (`EvictionMethod.merge`): called right after the gather with the kept tokens, it may
change their states but not which tokens are kept; the default changes nothing; `evicted` names the dropped."""

from dataclasses import dataclass

import pytest
import torch

from reference_impls import Compose, Full, KVCache
from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictionMethod, evicted
from reference_impls.eviction.streamingllm import StreamingLLM
from reference_impls.quantization import KIVI

from evict_checks import budget_at_least_length_is_full, ids


@dataclass
class MeanOfEvicted(EvictionMethod):
    """Toy merger: keep the newest tokens; every kept value becomes the mean of its head's evicted values."""

    def score(self, step, history, budget):
        return step.positions.float()

    def merge(self, step, history, idx, hole, k, v):
        out = evicted(step, idx, hole).float()  # (B, H_kv, T)
        mean = (out[..., None] * step.values).sum(2, keepdim=True) / out.sum(-1)[..., None, None].clamp(min=1)
        has = out.sum(-1)[..., None, None] > 0
        return k, torch.where(has, mean.expand_as(v), v)


def plain_mean_of_evicted(values, kept):
    """values (H, T, D), kept: per head the kept token indices -> per head the mean of the others' values."""
    out = []
    for h in range(values.shape[0]):
        dropped = [t for t in range(values.shape[1]) if t not in kept[h]]
        out.append(sum(values[h, t] for t in dropped) / len(dropped))
    return out


def test_evicted_marks_the_real_tokens_not_kept():
    keys = torch.zeros(1, 2, 6, 1)
    step = Step.dense(torch.zeros(1, 2, 1, 1), keys, keys)
    step.positions = torch.tensor([[[-1, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]])  # head 0: a padding slot
    idx = torch.tensor([[[1, 4, 0], [0, 2, 5]]])
    hole = torch.tensor([[[False, False, True], [False, False, False]]])  # head 0 keeps 2 (slot 3 empty)
    assert evicted(step, idx, hole).tolist() == [[[False, False, True, True, False, True],
                                                  [False, True, False, True, True, False]]]


def test_the_hook_changes_the_kept_values_by_its_formula_and_keeps_slots_and_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # 2 KV heads, GQA group of 2
    store = MeanOfEvicted(budget=5).new_layer(0, Model())
    store.append(k, v)
    store.after_attention(Step.dense(q, k, v))
    assert store.kept_slots()[0].tolist() == [list(range(7, 12))] * 2  # the newest 5, as without the hook
    assert torch.equal(store.k, k[:, :, 7:])  # keys untouched
    for h, mean in enumerate(plain_mean_of_evicted(v[0], [list(range(7, 12))] * 2)):
        assert torch.allclose(store.v[0, h], mean.expand(5, -1), atol=1e-6)


@torch.no_grad()
def test_the_hook_runs_inside_the_model_on_the_steps_states(tiny):
    cache = KVCache(tiny, MeanOfEvicted(budget=10))
    seen = {}
    for i, layer in enumerate(cache.layers):  # record the values each layer's prefill step held
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig):
            seen.setdefault(i, step.values.clone())
            orig(step)
        layer.store.after_attention = wrapped
    tiny(ids(30), cache=cache)
    for i, layer in enumerate(cache.layers):
        assert layer.store.kept_slots()[0].tolist() == [list(range(20, 30))] * 2
        for h, mean in enumerate(plain_mean_of_evicted(seen[i][0], [list(range(20, 30))] * 2)):
            assert torch.allclose(layer.store.v[0, h], mean.expand(10, -1), atol=1e-6)


@torch.no_grad()
def test_a_merging_method_composes_with_a_quantizer_which_holds_the_merged_states(tiny):
    x = ids(40)
    alone = KVCache(tiny, MeanOfEvicted(budget=12))
    tiny(x, cache=alone)
    both = KVCache(tiny, Compose(MeanOfEvicted(budget=12), KIVI(bits=8, group_size=4, residual_length=64)))
    tiny(x, cache=both)  # 12 kept tokens < KIVI's 64-token full-precision window: held exactly
    for a, b in zip(alone.layers, both.layers):
        assert torch.equal(a.store.kept_slots(), b.store.kept_slots())
        assert torch.equal(a.store.v, b.store.q.v) and torch.equal(a.store.k, b.store.q.k)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_never_calls_the_hook(tiny, budget):
    budget_at_least_length_is_full(tiny, MeanOfEvicted(budget=budget), same_bytes=True)


@torch.no_grad()
def test_the_default_hook_keeps_the_gathered_states(tiny):
    x = ids(40)
    plain = KVCache(tiny, StreamingLLM(budget=10))
    tiny(x, cache=plain)
    full = KVCache(tiny, Full())
    tiny(x, cache=full)
    for a, f in zip(plain.layers, full.layers):
        slots = a.store.kept_slots()[0, 0]
        assert torch.equal(a.store.v[0, 0], f.store.v[0, 0, slots])
