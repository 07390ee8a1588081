"""RazorAttention (arXiv 2407.15891): echo/induction scores, the head split of Algorithm 1 and the compensation token
(Eq. 4-5), checked against loops over positions and plain softmax attention with the mean key repeated."""

import pytest
import torch

from reference_impls import Full, KVCache, make_method
from reference_impls.base import Model
from reference_impls.generation import greedy_generate
from reference_impls.heads.razorattention import (RazorAttention, compensation_token, echo_induction_scores,
                                                  retrieval_heads)
from reference_impls.integration import model_info
from reference_impls.models import tiny_llama

from evict_checks import budget_at_least_length_is_full, ids


def plant(T, period, kind):
    """(T, T) causal attention rows: every query of the second copy puts 0.9 on its earlier occurrence (echo), on the
    token after it (induction), or spreads evenly (none); earlier queries spread evenly."""
    p = torch.zeros(T, T)
    for i in range(T):
        p[i, : i + 1] = 1.0 / (i + 1)
        if i >= period and kind != "none":
            j = i - period if kind == "echo" else i - period + 1
            p[i, : i + 1] *= 0.1
            p[i, j] += 0.9
    return p


def test_echo_and_induction_scores_equal_a_loop_over_the_planted_pattern():
    T, period = 24, 12
    probs = torch.stack([plant(T, period, k) for k in ("echo", "induction", "none")])[None]  # (1, 3, T, T)
    probs[0, 2] += torch.rand(T, T, generator=torch.Generator().manual_seed(0)).tril() * 0.01  # not symmetric
    echo, induction = echo_induction_scores(probs[:, :, period:], period)
    for h in range(3):
        e = sum(float(probs[0, h, i, i - period]) for i in range(period, T)) / (T - period)
        d = sum(float(probs[0, h, i, i - period + 1]) for i in range(period, T)) / (T - period)
        assert abs(float(echo[0, h]) - e) < 1e-6 and abs(float(induction[0, h]) - d) < 1e-6
    assert echo[0].argmax() == 0 and induction[0].argmax() == 1 and echo[0, 0] > 0.9 and induction[0, 1] > 0.9


def test_retrieval_heads_are_the_top_fractions_of_each_score():
    g = torch.Generator().manual_seed(1)
    echo, induction = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    got = retrieval_heads(echo, induction, echo_frac=0.05, induction_frac=0.2)
    flat_e = sorted(range(20), key=lambda i: -float(echo.flatten()[i]))[:1]  # round(0.05 * 20) = 1
    flat_i = sorted(range(20), key=lambda i: -float(induction.flatten()[i]))[:4]  # round(0.2 * 20) = 4
    assert sorted(torch.nonzero(got.flatten()).flatten().tolist()) == sorted(set(flat_e) | set(flat_i))
    assert not retrieval_heads(echo, induction, 0.0, 0.0).any()


@torch.no_grad()
def test_the_head_search_on_the_tiny_model_equals_a_loop_over_the_calibration_prefill():
    """Scores from the recorded "repeat" prefill by plain softmax per query, max over each GQA group, top heads."""
    model = tiny_llama()
    info = model_info(model)
    steps = info.calibration("repeat", 64)
    period, scores = 32, torch.zeros(2, 2, 2)  # (echo/induction, layer, KV head)
    for l, s in enumerate(steps):
        for h in range(4):
            e = d = 0.0
            for i in range(period, 64):
                row = torch.softmax(torch.stack([s.queries[0, h, i] @ s.keys[0, h // 2, j] * s.scaling
                                                 for j in range(i + 1)]), 0)
                e, d = e + float(row[i - period]) / period, d + float(row[i - period + 1]) / period
            scores[0, l, h // 2] = max(float(scores[0, l, h // 2]), e)
            scores[1, l, h // 2] = max(float(scores[1, l, h // 2]), d)
    method = RazorAttention(echo=0.25, induction=0.25, calib_tokens=64)
    expect = torch.zeros(4, dtype=torch.bool)
    expect[scores[0].flatten().argmax()] = expect[scores[1].flatten().argmax()] = True
    assert torch.equal(method.retrieval(info).flatten(), expect)


def razor(**kw):
    base = dict(echo=0.0, induction=0.25, n_sink=2, s0=4, compression=4, calib_tokens=64)
    return RazorAttention(**{**base, **kw})


@torch.no_grad()
@pytest.mark.parametrize("compression,s0", [(4, 4), (20, 6), (1, 4)])
def test_retrieval_heads_keep_everything_the_others_sinks_and_the_last_max_s0_n_over_c(compression, s0):
    model, T = tiny_llama(), 60
    method = razor(compression=compression, s0=s0)
    retrieval = method.retrieval(model_info(model))
    cache = KVCache(model, method)
    model(ids(T, seed=2), cache=cache)
    L = max(s0, round(T / compression))
    for l, layer in enumerate(cache.layers):
        kept = layer.store.kept_slots()
        for h in range(2):
            got = [s for s in (range(T) if kept is None else kept[0, h].tolist()) if s >= 0]
            expect = list(range(T)) if retrieval[l, h] else sorted(set(range(2)) | set(range(T - L, T)))
            assert got == expect, (l, h)


@torch.no_grad()
def test_the_compensation_token_is_the_mean_of_what_was_dropped_and_weighs_as_that_many_copies():
    """Eq. 4: k_hat, v_hat = mean of the dropped keys / values (a loop). Eq. 5: the decoding step's attention output
    equals plain softmax attention over the held keys plus n_d copies of k_hat (and v_hat), no bias."""
    model, T = tiny_llama(), 60
    method = razor()
    retrieval = method.retrieval(model_info(model))
    cache = KVCache(model, method)
    seen = {i: [] for i in range(2)}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig, store=layer.store):
            seen[i].append(dict(q=step.queries.clone(), k=step.keys.clone(), v=step.values.clone()))
            orig(step)
            seen[i][-1]["kept"] = store.kept_slots()
        layer.store.after_attention = wrapped
    outs = {}
    for i, blk in enumerate(model.model.layers):
        blk.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, i=i: outs.__setitem__(i, args[0].clone()))
    x = ids(T, seed=3)
    tok = model(x, cache=cache).logits[:, -1:].argmax(-1)
    model(tok, cache=cache)
    for l in range(2):
        pre, dec = seen[l]
        k_hat, v_hat, log_n, slot = cache.layers[l].store.comp
        for h in range(2):
            kept = [s for s in pre["kept"][0, h].tolist() if s >= 0]
            dropped = [j for j in range(T) if j not in kept]
            assert (len(dropped) == 0) == bool(retrieval[l, h])
            if dropped:
                mean_k = sum(pre["k"][0, h, j] for j in dropped) / len(dropped)
                mean_v = sum(pre["v"][0, h, j] for j in dropped) / len(dropped)
                assert torch.allclose(k_hat[0, h, 0], mean_k, atol=1e-6)
                assert torch.allclose(v_hat[0, h, 0], mean_v, atol=1e-6)
                assert abs(float(log_n[0, h].exp()) - len(dropped)) < 1e-3 and int(slot[0, h]) == dropped[0]
            # Eq. 5 by repetition: held keys (kept prompt tokens, then the new token) and len(dropped) copies of k_hat
            keys = [pre["k"][0, h, j] for j in kept] + [dec["k"][0, h, -1]] + [k_hat[0, h, 0]] * len(dropped)
            vals = [pre["v"][0, h, j] for j in kept] + [dec["v"][0, h, -1]] + [v_hat[0, h, 0]] * len(dropped)
            for g in range(2):
                qh = h * 2 + g
                p = torch.softmax(torch.stack([dec["q"][0, qh, 0] @ k for k in keys]) * 0.25, 0)  # scaling 16^-0.5
                ref = sum(pi * v for pi, v in zip(p, vals))
                assert torch.allclose(outs[l][0, 0, qh * 16:(qh + 1) * 16], ref, atol=1e-5), (l, qh)


@torch.no_grad()
def test_every_head_retrieving_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, RazorAttention(echo=1.0, calib_tokens=64), same_bytes=True)


@torch.no_grad()
def test_the_ratio_chooses_c_and_beyond_the_retrieval_heads_share_the_cache_is_the_most_compressed():
    """1 retrieval head of 4 (f = 1/4): at ratio 2 every layer's heads hold 2 x round(T / 2) tokens together (the
    sinks and the compensation token included); at ratio 8 (beyond 1 / f = 4) non-retrieval heads keep S0 only."""
    model, T = tiny_llama(), 200
    for ratio, s0 in ((2, 4), (8, 6)):
        cache = KVCache(model, razor(compression=None, ratio=ratio, s0=s0))
        model(ids(T, seed=5), cache=cache)
        held = 0
        for layer in cache.layers:
            kept = layer.store.kept_slots()
            held += int((kept >= 0).sum()) + int((layer.store.comp[1].abs().sum(-1) > 0).sum())  # + comp tokens
        L = round((T / ratio - T / 4) / (3 / 4) - 2 - 1) if ratio == 2 else s0
        assert held == T + 3 * (2 + max(L, s0) + 1), (ratio, held)  # 1 whole head, 3 with sinks, buffer, comp
        if ratio == 2:
            assert abs(held - 4 * T / ratio) <= 4  # on target, up to rounding
    plain = KVCache(model, razor(compensate=False))  # the ablation: remote tokens dropped, nothing stands for them
    model(ids(T, seed=5), cache=plain)
    assert all(layer.store.comp is None and layer.store.logit_bias() is None for layer in plain.layers)
    gen = greedy_generate(model, KVCache(model, make_method("razorattention", 4)), [ids(150)], 4)
    assert len(gen.tokens) == 4 and gen.kv_bytes < 2 * gen.full_kv_bytes  # fp32 held, 16-bit full


def test_compensation_token_function_on_a_hand_example():
    k = torch.arange(12.0).view(1, 1, 4, 3)
    k_hat, v_hat, n = compensation_token(k, -k, torch.tensor([[[True, False, True, False]]]))
    assert k_hat.tolist() == [[[[3.0, 4.0, 5.0]]]] and v_hat.tolist() == [[[[-3.0, -4.0, -5.0]]]]
    assert n.tolist() == [[2]]


def test_bad_parameters_are_rejected():
    for kw, name in ((dict(echo=1.5), "echo"), (dict(induction=-0.1), "induction"), (dict(n_sink=-1), "n_sink"),
                     (dict(s0=1.5), "s0"), (dict(compression=0.5), "compression"),
                     (dict(calib_tokens=4), "calib_tokens"),
                     (dict(compensate=1), "compensate"),
                     (dict(ratio=0.5), "ratio")):
        with pytest.raises(ValueError, match=name):
            RazorAttention(**kw)
    with pytest.raises(ValueError, match="calibrat"):
        RazorAttention().new_layer(0, Model(num_layers=1))
