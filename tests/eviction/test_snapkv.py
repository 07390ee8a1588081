"""SnapKV (arXiv 2404.14469): window votes, pooling, GQA averaging, kept sets and decoding, against plain references."""

import pytest
import torch
from transformers import AttentionInterface

from reference_impls import Full, KVCache
from reference_impls.eviction.snapkv import SnapKV, snapkv_scores
from reference_impls.integration import ATTN_NAME
from reference_impls.models import tiny_llama


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def naive_snapkv(q, k, scaling, kernel, pooling):
    """Algorithm 1 with loops: per query head, window rows of softmax(qk^T) over the causal prefix+window,
    summed over the window, prefix pooled with zero padding, then the mean over the heads of each KV group."""
    B, H, w, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    G, P = H // H_kv, T - w
    out = torch.zeros(B, H_kv, T)
    for b in range(B):
        for h in range(H):
            votes = torch.zeros(P)
            for i in range(w):
                n = P + i + 1  # query i sees tokens 0 .. P + i
                row = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // G, j] * scaling for j in range(n)]), 0)
                votes += row[:P]
            pooled = torch.zeros(P)
            r = kernel // 2
            for j in range(P):
                nb = [votes[t] for t in range(j - r, j + r + 1) if 0 <= t < P]
                pooled[j] = sum(nb) / kernel if pooling == "avg" else max(nb)  # avg counts the zero padding
            out[b, h // G, :P] += pooled / G
    return out


@pytest.mark.parametrize("pooling,kernel", [("avg", 5), ("avg", 1), ("max", 3)])
def test_scores_equal_algorithm_1_written_with_loops(pooling, kernel):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 23, 8, generator=g)
    ours = snapkv_scores(q, k, 0.35, kernel_size=kernel, pooling=pooling)
    ref = naive_snapkv(q, k, 0.35, kernel, pooling)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours[..., -6:] == 0).all()  # the window itself is not scored by votes


@torch.no_grad()
@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    x = ids(40)
    full, ours = KVCache(tiny, Full()), KVCache(tiny, SnapKV(budget=budget, window=8))
    assert torch.equal(tiny(x, cache=full).logits, tiny(x, cache=ours).logits)
    for t in (9, 10, 11):
        nxt = torch.tensor([[t]])
        assert torch.equal(tiny(nxt, cache=full).logits, tiny(nxt, cache=ours).logits)
    assert ours.nbytes() == full.nbytes() and ours.layers[0].store.kept_slots() is None


@torch.no_grad()
@pytest.mark.parametrize("budget,window", [(20, 8), (12, 12), (6, 8)])
def test_keeps_the_window_and_the_top_voted_prefix_in_every_layer_and_head(budget, window):
    """Kept = the window + the top (budget - window) prefix tokens by the loop reference's scores."""
    model, T = tiny_llama(), 50
    rec = {}
    cache = KVCache(model, SnapKV(budget=budget, window=window))
    orig = [layer.store.after_attention for layer in cache.layers]
    for i, layer in enumerate(cache.layers):  # capture each layer's queries/keys as the store saw them
        def spy(step, i=i):
            rec[i] = (step.queries.clone(), step.keys.clone(), step.scaling)
            orig[i](step)
        layer.store.after_attention = spy
    model(ids(T, seed=2), cache=cache)
    for i, layer in enumerate(cache.layers):
        q, k, scaling = rec[i]
        kept = layer.store.kept_slots()
        assert kept.shape == (1, 2, budget)
        if budget <= window:
            assert (kept == torch.arange(T - budget, T)).all()  # the most recent part of the window
            continue
        ref = naive_snapkv(q[:, :, -window:], k, scaling, 5, "avg")
        for h in range(2):
            top = ref[0, h, :T - window].topk(budget - window).indices.sort().values.tolist()
            assert kept[0, h].tolist() == top + list(range(T - window, T)), (i, h)


# ---- generation after eviction == attention over the kept tokens at their original positions --------------
_REF = {}


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention with a per-layer, per-KV-head boolean mask from _REF (the test's reference)."""
    mask = _REF[module.layer_idx]  # (B, H_kv, n, n)
    G = query.shape[1] // key.shape[1]
    logits = query @ key.repeat_interleave(G, 1).transpose(-1, -2) * scaling
    logits = logits.masked_fill(~mask.repeat_interleave(G, 1), float("-inf"))
    return (torch.softmax(logits, -1) @ value.repeat_interleave(G, 1)).transpose(1, 2), None


def reference_logits(model, seq, masks):
    AttentionInterface.register("snapkv_test_ref", _masked_attention)
    _REF.clear()
    _REF.update(masks)
    model.set_attn_implementation("snapkv_test_ref")
    try:
        return model(seq).logits[:, -1]
    finally:
        model.set_attn_implementation(ATTN_NAME)


def decode_matches_reference(model, method, T=40, steps=5, seed=4):
    """Decode `steps` tokens with `method`; each must equal a full forward in which layer l, head h of every
    generated token sees only what that layer's store kept from the prompt, plus the generated tokens."""
    x = ids(T, seed=seed)
    cache = KVCache(model, method)
    with torch.no_grad():
        logits = model(x, cache=cache).logits[:, -1]
        kept = {i: layer.store.kept_slots() for i, layer in enumerate(cache.layers)}  # (1, H_kv, K)
        seq = x
        for step in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, tok], dim=1)
            n = seq.shape[1]
            masks = {}
            for i, s in kept.items():
                H_kv = s.shape[1]
                m = torch.ones(n, n, dtype=torch.bool).tril().expand(1, H_kv, n, n).clone()
                m[:, :, T:, :T] = False
                for h in range(H_kv):
                    prompt_kept = s[0, h][(s[0, h] >= 0) & (s[0, h] < T)]
                    m[0, h, T:, prompt_kept] = True
                masks[i] = m
            ref = reference_logits(model, seq, masks)
            logits = model(tok, cache=cache).logits[:, -1]
            assert torch.allclose(logits, ref, atol=1e-5), step
    return cache


def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    decode_matches_reference(tiny_llama(), SnapKV(budget=15, window=6))


@torch.no_grad()
def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    a, b = ids(30, seed=5), ids(22, seed=6)
    method = SnapKV(ratio=2, window=6)
    singles = []
    for x in (a, b):
        c = KVCache(tiny, method)
        out = [tiny(x, cache=c).logits[:, -1]]
        for t in (11, 12, 13):
            out.append(tiny(torch.tensor([[t]]), cache=c).logits[:, -1])
        singles.append(torch.cat(out))
    pad = torch.zeros(1, 8, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    c = KVCache(tiny, method)
    outs = [tiny(batch, attention_mask=mask, cache=c).logits[:, -1]]
    for t in (11, 12, 13):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        outs.append(tiny(torch.tensor([[t], [t]]), attention_mask=mask, cache=c).logits[:, -1])
    outs = torch.stack(outs, 1)
    for row in range(2):
        assert torch.allclose(outs[row], singles[row], atol=1e-5), row
    held = c.layers[1].store.kept_slots()[:, :, :-3]  # the prompt's part (3 decoded tokens appended)
    assert (held[0] >= 0).sum(-1).tolist() == [15, 15] and (held[1] >= 0).sum(-1).tolist() == [11, 11]


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="window"):
        SnapKV(window=0)
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKV(kernel_size=4)
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(pooling="mean")
    with pytest.raises(ValueError, match="ratio"):
        SnapKV.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    from reference_impls import run_sample
    from reference_impls.data import passkey_samples

    model, tok = smollm
    s = passkey_samples(1, 800, seed=1, tokenizer=tok)[0]
    for ratio in (2, 4, 8):
        r = run_sample(model, tok, SnapKV(ratio=ratio), s["context"], s["question"], max_new_tokens=4)
        assert abs(r["achieved_ratio"] / ratio - 1) < 0.05, (ratio, r["achieved_ratio"])
