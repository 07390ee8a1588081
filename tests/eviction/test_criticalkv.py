"""CriticalKV (arXiv 2502.03805): ||v W_o||_1 with loops, Algorithm 1's two stages on the tiny model, invariants."""

from dataclasses import dataclass

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import CriticalKV, EvictionMethod, KNorm, SnapKV
from reference_impls.eviction.criticalkv import projected_value_norm
from reference_impls.models import tiny_llama

from evict_checks import (budget_at_least_length_is_full, decode_matches_reference, ids, kept_counts_equal_budget,
                          left_padded_batch_equals_batch_one, naive_probs)


def hf_weights(model, i):
    attn = model.model.layers[i].self_attn
    return {"q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight, "o": attn.o_proj.weight}


@pytest.fixture
def with_weights(monkeypatch):
    """Every cache made in the test can read its model's projections (what `Model.weights` gives)."""
    real_init = KVCache.__init__

    def init(self, model, *args, **kwargs):
        real_init(self, model, *args, **kwargs)
        self.model_info.weights = lambda i: hf_weights(model, i)
    monkeypatch.setattr(KVCache, "__init__", init)


@dataclass
class LastQueryAttention(EvictionMethod):
    """A stand-in for the attention A of Algorithm 1: the last query's attention, averaged over each GQA group."""

    def score(self, step, history, budget):
        p = step.probs()[:, :, -1]  # (B, H, T)
        B, H, T = p.shape
        return p.view(B, step.keys.shape[1], -1, T).mean(2)


def record_steps(cache):
    """Per layer: queries, keys, values and mask of the compressing step, and what the store kept."""
    log = {}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig, store=layer.store):
            entry = dict(q=step.queries.clone(), k=step.keys.clone(), v=step.values.clone(), mask=step.mask.clone())
            orig(step)
            log.setdefault(i, {**entry, "kept": store.kept_slots()})
        layer.store.after_attention = wrapped
    return log


def naive_vnorm(v, w_o, H):
    """Per KV head and token: the mean over its G query heads of sum_j |sum_d v_d W_o[j, h D + d]|. v (H_kv, T, D)."""
    H_kv, T, D = v.shape
    G = H // H_kv
    out = torch.zeros(H_kv, T)
    for kv in range(H_kv):
        for t in range(T):
            for h in range(kv * G, kv * G + G):
                out[kv, t] += (w_o[:, h * D:(h + 1) * D] @ v[kv, t]).abs().sum() / G
    return out


def test_projected_value_norm_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    v, w_o = torch.randn(1, 2, 7, 4, generator=g), torch.randn(10, 6 * 4, generator=g)  # H = 6, G = 3
    assert torch.allclose(projected_value_norm(v, w_o, 6)[0], naive_vnorm(v[0], w_o, 6), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("alpha,budget", [(0.5, 12), (0.25, 9), (0.0, 10)])
def test_two_stages_follow_algorithm_1_in_every_layer_and_head(with_weights, alpha, budget):
    """S1 = top int(alpha b) by A, S2 = the next b - |S1| by (A + eps) ||v W_o||_1 among the rest, with loops."""
    model, T, eps = tiny_llama(), 40, 1e-4
    cache = KVCache(model, CriticalKV(budget=budget, base=LastQueryAttention(), first_stage_ratio=alpha, epsilon=eps))
    log = record_steps(cache)
    model(ids(T, seed=3), cache=cache)
    H = model.config.num_attention_heads
    for i, e in log.items():
        A = naive_probs(e["q"][0, :, -1], e["k"][0], e["mask"][0, :, -1], model.config.head_dim ** -0.5)
        A = A.view(2, H // 2, T).mean(1)  # (H_kv, T)
        vn = naive_vnorm(e["v"][0], hf_weights(model, i)["o"], H)
        for h in range(2):
            n1 = int(alpha * budget)
            first = sorted(range(T), key=lambda t: -A[h, t].item())[:n1]
            rest = sorted((t for t in range(T) if t not in first), key=lambda t: -((A[h, t] + eps) * vn[h, t]).item())
            assert e["kept"][0, h].tolist() == sorted(first + rest[:budget - n1]), (i, h)


@torch.no_grad()
def test_alpha_one_is_the_base_method_and_the_window_is_always_kept(tiny, with_weights):
    x = ids(50, seed=4)
    kept = {}
    for name, method in (("base", SnapKV(budget=14, window=6)),
                         ("alpha=1", CriticalKV(budget=14, base=SnapKV(window=6), first_stage_ratio=1.0)),
                         ("alpha=0", CriticalKV(budget=14, base=SnapKV(window=6), first_stage_ratio=0.0))):
        c = KVCache(tiny, method)
        tiny(x, cache=c)
        kept[name] = [layer.store.kept_slots() for layer in c.layers]
    for base, same, other in zip(kept["base"], kept["alpha=1"], kept["alpha=0"]):
        assert torch.equal(base, same)
        assert (other[..., -6:] == torch.arange(44, 50)).all()  # the observation window, whatever alpha
    assert any(not torch.equal(b, o) for b, o in zip(kept["base"], kept["alpha=0"]))  # stage 2 changes the choice


@torch.no_grad()
def test_adaptive_heads_split_the_budget_as_adakv_over_the_base_then_run_both_stages(tiny, with_weights):
    """CriticalAdaKV: each head's count is Ada-KV's split of the base scores; within it, Algorithm 1."""
    x = ids(50, seed=5)
    base = KVCache(tiny, SnapKV(budget=12, window=4, heads="adaptive"))
    tiny(x, cache=base)
    ours = KVCache(tiny, CriticalKV(budget=12, base=SnapKV(window=4), heads="adaptive", first_stage_ratio=0.5))
    log = record_steps(ours)
    tiny(x, cache=ours)
    differs, uneven = False, False
    for i, (b, o) in enumerate(zip(base.layers, ours.layers)):
        counts = (b.store.kept_slots() >= 0).sum(-1)
        assert torch.equal((o.store.kept_slots() >= 0).sum(-1), counts), i
        assert counts.sum() == 2 * 12, i
        uneven |= len(set(counts[0].tolist())) > 1
        held_base = [set(h.tolist()) - {-1} for h in b.store.kept_slots()[0]]
        held = [set(h.tolist()) - {-1} for h in log[i]["kept"][0]]
        for h in range(2):  # stage 1 (int(0.5 count) best base scores) is a subset of the base's own choice
            assert len(held[h] & held_base[h]) >= int(0.5 * counts[0, h])
        differs |= held != held_base
    assert differs and uneven


def test_every_layer_and_head_keeps_the_budget(tiny, with_weights):
    kept_counts_equal_budget(tiny, CriticalKV(budget=13, base=SnapKV(window=4)), budget=13)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, CriticalKV(budget=budget, base=SnapKV(window=4)), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny, with_weights):
    left_padded_batch_equals_batch_one(tiny, CriticalKV(ratio=2, base=SnapKV(window=6)), steps=3)


def test_generation_after_eviction_equals_attention_over_kept_tokens(with_weights):
    decode_matches_reference(tiny_llama(), CriticalKV(budget=15, base=SnapKV(window=6)))


def test_missing_weights_and_bad_parameters_are_rejected(tiny):
    cache = KVCache(tiny, CriticalKV(budget=5, base=SnapKV(window=2)))
    cache.model_info.weights = None
    with pytest.raises(ValueError, match="W_o"):
        with torch.no_grad():
            tiny(ids(20), cache=cache)
    for knob, value in (("first_stage_ratio", 1.5), ("epsilon", -1), ("base", "not a method"), ("heads", "threshold")):
        with pytest.raises(ValueError, match=knob if knob != "base" else "unknown method|base"):
            CriticalKV(**{knob: value})
    with pytest.raises(ValueError, match="base"):
        CriticalKV(base=CriticalKV())
    assert isinstance(CriticalKV(base="knorm").base, KNorm)  # a method id, as the command line gives it
    with pytest.raises(ValueError, match="ratio"):
        CriticalKV.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm, with_weights):
    from evict_checks import achieved_ratio_is_on_target

    achieved_ratio_is_on_target(*smollm, CriticalKV)
