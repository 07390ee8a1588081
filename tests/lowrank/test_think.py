"""ThinK (arXiv 2407.21018): query-driven key channel pruning, checked against the paper's score as a loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from reference_impls import Compose, Full, KVCache, SnapKV, make_method
from reference_impls.base import Model, Step
from reference_impls.integration import ATTN_NAME
from reference_impls.lowrank.think import ThinK, think_channels, think_prune, think_restore, think_scores
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def loop_scores(q_obs, k, q_valid=None, k_valid=None):
    """Score_i[j] = ||Q_obs[:, j] K[:, j]^T||_F with the outer product written out, per KV head; the window's
    rows of the G query heads of a group stacked; invalid (padding) rows dropped."""
    B, H, w, D = q_obs.shape
    H_kv = k.shape[1]
    G = H // H_kv
    out = torch.zeros(B, H_kv, D)
    for b in range(B):
        for h in range(H_kv):
            for j in range(D):
                qs = [q_obs[b, h * G + g, i, j] for g in range(G) for i in range(w) if q_valid is None or q_valid[b, i]]
                ks = [k[b, h, t, j] for t in range(k.shape[2]) if k_valid is None or k_valid[b, h, t]]
                logits = torch.outer(torch.stack(qs).float(), torch.stack(ks).float())  # (G w, T) slice of Q K^T
                out[b, h, j] = torch.sqrt((logits ** 2).sum())
    return out


def loop_mask(scores, keep):
    """The `keep` channels of largest score per head, by sorting a Python list."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            order = sorted(range(scores.shape[2]), key=lambda j: -scores[b, h, j].item())
            mask[b, h, order[:keep]] = True
    return mask


def test_scores_equal_the_papers_frobenius_norm_as_a_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g) * torch.arange(1, 9)
    assert torch.allclose(think_scores(q, k), loop_scores(q, k), rtol=1e-5)
    q_valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    k_valid = torch.rand(2, 2, 11, generator=g) > 0.3
    assert torch.allclose(think_scores(q, k, q_valid=q_valid, k_valid=k_valid),
                          loop_scores(q, k, q_valid, k_valid), rtol=1e-5)
    # without GQA the ranking is the official code's: mean(q^2) * mean(k^2) per channel
    q1 = q[:, :2]
    official = q1.pow(2).mean(2) * k.pow(2).mean(2)
    assert torch.equal(think_channels(think_scores(q1, k), 5), think_channels(official, 5))


def test_pruned_keys_give_the_dot_product_restricted_to_the_kept_channels():
    g = torch.Generator().manual_seed(1)
    k, q = torch.randn(2, 3, 7, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    mask = loop_mask(torch.rand(2, 3, 10, generator=g), 6)
    kept = think_prune(k, mask)
    assert kept.shape == (2, 3, 7, 6)
    restored = think_restore(kept, mask)
    assert torch.equal(restored, k * mask[:, :, None, :])  # pruned channels read as exact zeros
    for b in range(2):
        for h in range(3):
            for t in range(7):
                ref = sum(q[b, h, j] * k[b, h, t, j] for j in range(10) if mask[b, h, j])
                assert torch.allclose(restored[b, h, t] @ q[b, h], ref, atol=1e-5)


@pytest.mark.parametrize("lam,window,recent,T0,D", [(0.5, 4, 3, 20, 16), (0.4, 32, 32, 50, 8), (0.75, 6, 0, 9, 12)])
def test_store_holds_the_kept_channels_of_the_prompt_and_everything_else_whole(lam, window, recent, T0, D):
    g = torch.Generator().manual_seed(T0)
    B, H_kv, G = 2, 3, 2
    k_all, v_all = torch.randn(B, H_kv, T0 + 5, D, generator=g), torch.randn(B, H_kv, T0 + 5, D, generator=g)
    q_pre = torch.randn(B, H_kv * G, T0, D, generator=g)
    method = ThinK(pruning_ratio=lam, window=window, recent=recent)
    store = method.new_layer(0, Model())
    kk, vv, _ = store.append(k_all[:, :, :T0], v_all[:, :, :T0])
    assert torch.equal(kk, k_all[:, :, :T0])  # the prefill attends to the full keys
    store.after_attention(Step.dense(q_pre, kk, vv))
    keep = D - math.floor(D * lam)
    mask = loop_mask(loop_scores(q_pre[:, :, -window:], k_all[:, :, :T0]), keep)
    n = max(T0 - recent, 0)
    expected = torch.cat([k_all[:, :, :n] * mask[:, :, None, :], k_all[:, :, n:T0]], 2)
    for t in range(T0, T0 + 5):  # decoding: the pruned prompt, then tokens stored whole
        kk, vv, slots = store.append(k_all[:, :, t:t + 1], v_all[:, :, t:t + 1])
        expected = torch.cat([expected, k_all[:, :, t:t + 1]], 2)
        assert slots is None and torch.equal(kk, expected) and torch.equal(vv, v_all[:, :, :t + 1])
        store.after_attention(Step.dense(kk[:, :, -1:].repeat_interleave(G, 1), kk, vv, compress=False))
    elt = k_all.element_size()
    held = B * H_kv * (n * keep + (T0 + 5 - n) * D + (T0 + 5) * D) * elt + B * H_kv * math.ceil(D / 8)
    assert store.nbytes() == held  # kept channels + whole keys + all values + a D-bit mask per head


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("T,D,dtype", [(300, 64, torch.float32), (1000, 32, torch.float16)])
def test_nominal_ratio_is_the_measured_ratio(lam, T, D, dtype):
    g = torch.Generator().manual_seed(T)
    k, v = torch.randn(1, 3, T, D, generator=g).to(dtype), torch.randn(1, 3, T, D, generator=g).to(dtype)
    method = ThinK(pruning_ratio=lam)
    store = method.new_layer(0, Model())
    kk, vv, _ = store.append(k, v)
    store.after_attention(Step.dense(torch.randn(1, 9, T, D, generator=g).to(dtype), kk, vv))
    measured = (k.nbytes + v.nbytes) / store.nbytes()
    assert measured == pytest.approx(method.nominal_ratio(CacheSpec(bits=torch.finfo(dtype).bits, head_dim=D,
                                                                    tokens=T)), rel=1e-12)
    assert measured < 2  # values are whole: K + V can never shrink by 2x


@torch.no_grad()
def test_lambda_zero_is_identical_to_full_and_bytes_shrink_by_the_pruned_fraction(tiny):
    x = ids(40)
    full, none, half = KVCache(tiny, Full()), KVCache(tiny, ThinK(pruning_ratio=0.0)), \
        KVCache(tiny, ThinK(pruning_ratio=0.5, window=8, recent=0))
    ref = tiny(x, cache=full).logits
    assert torch.equal(tiny(x, cache=none).logits, ref) and torch.equal(tiny(x, cache=half).logits, ref)
    L, H_kv, D = 2, 2, 16
    assert half.nbytes() == full.nbytes() * 3 // 4 + L * H_kv * D // 8  # keys halved, values whole, + the masks
    for t in (5, 6, 7):
        nxt = torch.tensor([[t]])
        a, b, c = tiny(nxt, cache=full).logits, tiny(nxt, cache=none).logits, tiny(nxt, cache=half).logits
        assert torch.equal(a, b)
        assert not torch.allclose(a, c, atol=1e-3)  # half the key channels gone: the logits move
    assert none.nbytes() == full.nbytes() + L * H_kv * D // 8


# ---- end to end: generation == a plain forward whose generated tokens see the prompt keys pruned ----------
_PRUNE = {}


def _pruned_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal SDPA; rows from position T on see the keys of positions < n with their pruned channels zeroed."""
    T, n, mask = _PRUNE[module.layer_idx]
    G = q.shape[1] // k.shape[1]
    k_pruned = k.clone()
    k_pruned[:, :, :n] *= mask[:, :, None, :]
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True,
                                          scale=scaling)
    pruned = F.scaled_dot_product_attention(q, k_pruned.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                            is_causal=True, scale=scaling)
    return torch.cat([full[:, :, :T], pruned[:, :, T:]], 2).transpose(1, 2).contiguous(), None


@torch.no_grad()
def test_greedy_generation_equals_attention_over_the_pruned_prompt_keys(tiny):
    T, window, recent, lam = 40, 8, 4, 0.5
    x = ids(T, seed=3)
    cache = KVCache(tiny, ThinK(pruning_ratio=lam, window=window, recent=recent))
    seen = {}
    for i, layer in enumerate(cache.layers):  # record each layer's prefill queries and keys
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig):
            seen.setdefault(i, (step.queries.clone(), step.keys.clone()))
            orig(step)
        layer.store.after_attention = wrapped
    logits = tiny(x, cache=cache).logits[:, -1]
    D = seen[0][1].shape[-1]
    for i, (q, k) in seen.items():
        _PRUNE[i] = (T, T - recent, loop_mask(loop_scores(q[:, :, -window:], k), D - int(D * lam)))
    AttentionInterface.register("think_ref", _pruned_attention)
    AttentionMaskInterface.register("think_ref", sdpa_mask)
    seq, full_cache = x, KVCache(tiny, Full())
    full_logits = tiny(x, cache=full_cache).logits[:, -1]
    for s in range(5):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        tiny.set_attn_implementation("think_ref")
        try:
            ref = tiny(seq).logits[:, -1]
        finally:
            tiny.set_attn_implementation(ATTN_NAME)
        logits = tiny(tok, cache=cache).logits[:, -1]
        full_logits = tiny(tok, cache=full_cache).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-5), s
        assert not torch.allclose(logits, full_logits, atol=1e-3), s  # the pruning is visible
    assert cache.get_seq_length() == T + 5


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(tiny):
    method = ThinK(pruning_ratio=0.5, window=8, recent=4)
    a, b = ids(30, seed=5), ids(22, seed=6)
    alone = []
    for x in (a, b):
        c = KVCache(tiny, method)
        alone.append(torch.cat([tiny(x, cache=c).logits[:, -1]] + [tiny(torch.tensor([[11 + t]]), cache=c).logits[:, -1]
                                                                     for t in range(3)]))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    c = KVCache(tiny, method)
    # each row's own positions (as generate() passes them): a channel's size after RoPE depends on the position
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [tiny(batch, attention_mask=mask, position_ids=pos, cache=c).logits[:, -1]]
    for t in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1
        outs.append(tiny(torch.tensor([[11 + t]] * 2), attention_mask=mask, position_ids=pos, cache=c).logits[:, -1])
    outs = torch.stack(outs, 1)
    for row in (0, 1):  # padding queries and keys take no part in the channel scores
        assert torch.allclose(outs[row], alone[row], atol=1e-5), row


@torch.no_grad()
def test_composes_with_snapkv_on_the_kept_tokens(tiny):
    """SnapKV keeps the same tokens as alone; ThinK prunes their keys, scored on the kept keys (official order)."""
    T, budget, window, recent, lam = 50, 20, 8, 4, 0.5
    x = ids(T, seed=2)
    alone = KVCache(tiny, SnapKV(budget=budget, window=window))
    both = KVCache(tiny, Compose(SnapKV(budget=budget, window=window), ThinK(lam, window=window, recent=recent)))
    used = {id(alone): {}, id(both): {}}
    for cache in (alone, both):
        for i, layer in enumerate(cache.layers):
            orig = layer.store.after_attention

            def wrapped(step, i=i, orig=orig, log=used[id(cache)]):
                log.setdefault(i, []).append((step.queries.clone(), step.keys.clone(), step.values.clone()))
                orig(step)
            layer.store.after_attention = wrapped
    tiny(x, cache=alone), tiny(x, cache=both)
    tiny(torch.tensor([[7]]), cache=alone), tiny(torch.tensor([[7]]), cache=both)
    n = budget - recent
    for i in range(len(tiny.model.layers)):
        (q_pre, _, _), (_, k_a, v_a) = used[id(alone)][i]
        _, k_b, v_b = used[id(both)][i][1]
        D = k_a.shape[-1]
        mask = loop_mask(loop_scores(q_pre[:, :, -window:], k_a[:, :, :budget]), D - int(D * lam))
        assert torch.equal(v_b[:, :, :budget], v_a[:, :, :budget])
        assert torch.equal(k_b[:, :, :n], k_a[:, :, :n] * mask[:, :, None, :])
        assert torch.equal(k_b[:, :, n:budget], k_a[:, :, n:budget])  # the newest kept tokens: whole
    L, H_kv, D = 2, 2, 16
    assert both.nbytes() == alone.nbytes() - L * H_kv * n * (D // 2) * 4 + L * H_kv * D // 8
    made = make_method("snapkv+think", 4)
    assert isinstance(made, Compose) and made.evict.ratio == 2 and made.quant == ThinK(pruning_ratio=0.9)


def test_from_ratio_picks_the_nearest_reachable_lambda():
    # nominal ratios on the benchmark's 16-bit cache (D = 64, 1,500 tokens): lambda 0.1 .. 0.9
    ratios = [ThinK(pruning_ratio=p / 10).nominal_ratio() for p in range(1, 10)]
    assert ratios == sorted(ratios) and ratios[-1] < 2
    assert [round(r, 2) for r in ratios] == [1.05, 1.1, 1.17, 1.24, 1.32, 1.41, 1.51, 1.64, 1.77]
    assert [ThinK.from_ratio(r).pruning_ratio for r in (1, 1.24, 1.32, 1.5, 2, 4, 8)] == [0.1, 0.4, 0.5, 0.7, 0.9,
                                                                                         0.9, 0.9]
    assert make_method("think", 1.3) == ThinK(pruning_ratio=0.5)
    assert ThinK.from_ratio(2, window=16).window == 16  # knobs the caller fixed are kept
    assert ThinK().nominal_ratio(EMBEDDED) == pytest.approx(2 / (1 + (1468 * 39 + 32 * 64 + 4) / (1500 * 64)))
    with pytest.raises(ValueError, match="ThinK: ratio"):
        ThinK.from_ratio(0.5)


def test_bad_parameters_are_rejected():
    for bad in (1.0, -0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="pruning_ratio must be a number in"):
            ThinK(pruning_ratio=bad)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        ThinK(window=0)
    with pytest.raises(ValueError, match="recent must be an int >= 0"):
        ThinK(recent=-1)
    with pytest.raises(ValueError, match="Compose: quant"):
        Compose(SnapKV(ratio=2), SnapKV(ratio=2))
