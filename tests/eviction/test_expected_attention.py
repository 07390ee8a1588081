"""Expected Attention (arXiv 2510.00636): closed form, Monte Carlo, kvpress's recipe on the tiny model, invariants."""

import math

import pytest
import torch

from reference_impls import KVCache
from reference_impls.base import Model, Step
from reference_impls.eviction.expected_attention import ExpectedAttention, expected_attention_scores, query_statistics
from reference_impls.models import tiny_llama

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, decode_matches_reference, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one)


def rope_matrix(pos, D, theta=10000.0):
    """RoPE at one position as an explicit D x D matrix (Llama's rotate-half layout): pairs (i, i + D/2)."""
    R = torch.zeros(D, D, dtype=torch.float64)
    for i in range(D // 2):
        a = pos * theta ** (-2 * i / D)
        R[i, i], R[i, i + D // 2] = math.cos(a), -math.sin(a)
        R[i + D // 2, i], R[i + D // 2, i + D // 2] = math.sin(a), math.cos(a)
    return R


def cos_sin(positions, D, theta=10000.0):
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    f = positions[..., None].double() * inv
    emb = torch.cat([f, f], -1)
    return emb.cos().float(), emb.sin().float()


@pytest.mark.parametrize("use_cov,use_vnorm,eps", [(True, True, 0.0), (False, True, 0.0), (True, False, 0.0),
                                                   (True, True, 0.01)])
def test_scores_equal_the_closed_form_written_with_explicit_rotation_matrices(use_cov, use_vnorm, eps):
    """Loops: R = mean of the explicit RoPE matrices over the future positions, logit = s (R mu).k + s^2/2 k^T R S R^T k
    per query head, softmax over keys, mean over the GQA group, times ||v||."""
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, D, F, start = 1, 4, 2, 9, 8, 5, 30
    mu = torch.randn(B, H, D, generator=g)
    A = torch.randn(B, H, D, D, generator=g) * 0.3
    cov = A @ A.transpose(-1, -2)
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    cos_f, sin_f = cos_sin(torch.arange(start, start + F)[None], D)
    s = D ** -0.5
    ours = expected_attention_scores(mu, cov if use_cov else None, k, v, cos_f, sin_f, s, use_vnorm=use_vnorm,
                                     epsilon=eps)
    R = sum(rope_matrix(start + j, D) for j in range(F)) / F
    ref = torch.zeros(B, H_kv, T, dtype=torch.float64)
    for h in range(H):
        m, S = R @ mu[0, h].double(), R @ cov[0, h].double() @ R.T
        logits = []
        for t in range(T):
            kt = k[0, h // 2, t].double()
            logits.append(s * (m @ kt) + (s * s / 2 * (kt @ S @ kt) if use_cov else 0.0))
        ref[0, h // 2] += torch.softmax(torch.stack(logits), 0) / 2
    if use_vnorm:
        ref = (ref + eps) * v.double().norm(dim=-1)
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-6)


def test_closed_form_is_the_expectation_over_gaussian_queries():
    """exp(s mu.k + s^2/2 k^T S k) is E[exp(s q.k)] for q ~ N(mu, S): compare with a Monte Carlo average."""
    g = torch.Generator().manual_seed(1)
    D, s = 6, 0.4
    mu, A = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3
    S = A @ A.T
    k = torch.randn(D, generator=g, dtype=torch.float64)
    q = mu + torch.randn(400_000, D, generator=g, dtype=torch.float64) @ A.T
    mc = torch.exp(s * q @ k).mean()
    assert math.isclose(mc.item(), math.exp(s * mu @ k + s * s / 2 * k @ S @ k), rel_tol=0.01)


def test_query_statistics_are_the_weighted_mean_and_biased_covariance():
    q = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([[False, True, True, True, True, True, True], [False, False, True, True, False, True, True]])
    mu, cov = query_statistics(q, w)
    for b in range(2):
        x = q[b][:, w[b]]  # (H, n, D)
        assert torch.allclose(mu[b], x.mean(1), atol=1e-6)
        centred = x - x.mean(1, keepdim=True)
        assert torch.allclose(cov[b], centred.transpose(1, 2) @ centred / x.shape[1], atol=1e-5)


def record_steps(cache):
    """Per layer, the keys and values of the step that compressed (what the store scored)."""
    log = {}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig, store=layer.store):
            log.setdefault(i, (step.keys.clone(), step.values.clone()))
            orig(step)
        layer.store.after_attention = wrapped
    return log


@torch.no_grad()
@pytest.mark.parametrize("n_sink,budget", [(4, 15), (0, 9)])
def test_keeps_what_kvpress_recipe_keeps_from_hidden_states(n_sink, budget):
    """kvpress's ExpectedAttentionPress recipe, written here: pre-RoPE queries re-projected from the hidden states with
    q_proj (not un-rotated), sinks' queries dropped, R = mean of cos I + sin P over the next F positions from the
    model's own rotary module, scores = mean over the group of softmax(...) times ||v||, sinks above the max."""
    model, T, F = tiny_llama(), 48, 16
    hidden = {}

    def grab(i):
        def hook(module, args, kwargs):
            hidden.setdefault(i, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return hook
    hooks = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    cache = KVCache(model, ExpectedAttention(budget=budget, n_sink=n_sink, n_future_positions=F))
    log = record_steps(cache)
    try:
        model(ids(T, seed=3), cache=cache)
    finally:
        for h in hooks:
            h.remove()
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.head_dim
    for i, layer in enumerate(cache.layers):
        attn = model.model.layers[i].self_attn
        h = hidden[i][:, n_sink:]
        q = attn.q_proj(h).view(1, -1, H, D).transpose(1, 2)[0]  # (H, n, D) before RoPE
        mu = q.mean(1)
        centred = q - mu[:, None]
        cov = centred.transpose(1, 2) @ centred / h.shape[1]
        cos, sin = model.model.rotary_emb(h, torch.arange(T, T + F)[None])
        P = torch.zeros(D, D)
        P[D // 2:, :D // 2], P[:D // 2, D // 2:] = torch.eye(D // 2), -torch.eye(D // 2)
        R = (cos[0][:, None] * torch.eye(D) + sin[0][:, None] * P).mean(0)
        mu, cov = mu @ R.T, R @ cov @ R.T
        k, v = log[i][0][0], log[i][1][0]  # (H_kv, T, D)
        G = H // k.shape[0]
        for kv in range(k.shape[0]):
            score = torch.zeros(T - n_sink)
            for hq in range(kv * G, kv * G + G):
                kk = k[kv, n_sink:]
                logits = kk @ mu[hq] / math.sqrt(D) + ((kk @ cov[hq]) * kk).sum(-1) / D / 2
                score += torch.softmax(logits, 0) / G
            score = score * v[kv, n_sink:].norm(dim=-1)
            full = torch.cat([torch.full((n_sink,), score.max().item() + 1), score])
            expect = full.topk(budget).indices.sort().values.tolist()
            assert layer.store.kept_slots()[0, kv].tolist() == expect, (i, kv)


def test_every_layer_and_head_keeps_the_budget(tiny):
    kept_counts_equal_budget(tiny, ExpectedAttention(budget=13, n_future_positions=32), budget=13)


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, ExpectedAttention(budget=budget), same_bytes=True)


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, ExpectedAttention(ratio=2, n_future_positions=64), steps=3)


def test_generation_after_eviction_equals_attention_over_kept_tokens():
    decode_matches_reference(tiny_llama(), ExpectedAttention(budget=14, n_future_positions=32))


def test_bad_parameters_and_a_model_without_rope_are_rejected():
    for knob, value in (("n_future_positions", 0), ("n_sink", -1), ("use_covariance", 1), ("use_vnorm", "yes"),
                        ("epsilon", -0.1)):
        with pytest.raises(ValueError, match=knob):
            ExpectedAttention(**{knob: value})
    with pytest.raises(ValueError, match="ratio"):
        ExpectedAttention.from_ratio(0.5)
    store = ExpectedAttention(budget=2).new_layer(0, Model(num_layers=1, rope=None))
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="rotary"):
        store.after_attention(Step.dense(q, k, k))


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    achieved_ratio_is_on_target(*smollm, ExpectedAttention)
