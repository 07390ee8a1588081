"""Checks shared by the eviction tests: plain references, no method code. Every test file calls these for the
invariants all eviction methods share; what is particular to a method stays in its own file."""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from reference_impls import Full, KVCache
from reference_impls.integration import ATTN_NAME


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def spy(cache):
    """Record, per layer, every step's (queries, keys, slots, mask, kept slots after the step). Without left
    padding a key's position is its stream slot, which is what `kept_slots()` reports."""
    log = {i: [] for i in range(len(cache.layers))}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.after_attention

        def wrapped(step, i=i, orig=orig, store=layer.store):
            entry = dict(q=step.queries.clone(), k=step.keys.clone(), slots=step.positions.clone(),
                         mask=step.mask.clone(), scaling=step.scaling)
            orig(step)
            kept = store.kept_slots()
            entry["kept"] = step.positions.clone() if kept is None else kept.clone()
            log[i].append(entry)
        layer.store.after_attention = wrapped
    return log


def naive_probs(q, k, mask, scaling):
    """Per query head, softmax(q k^T * s) over the keys the mask allows; q (H, D), k (H_kv, T, D) -> (H, T)."""
    H, H_kv = q.shape[0], k.shape[0]
    out = torch.zeros(H, k.shape[1])
    for h in range(H):
        logits = (k[h // (H // H_kv)] @ q[h]) * scaling
        logits = logits.masked_fill(~mask[h // (H // H_kv)], float("-inf"))
        out[h] = torch.softmax(logits, 0)
    return out


@torch.no_grad()
def budget_at_least_length_is_full(model, method, same_bytes=False):
    """Budget >= every length reached (40 prompt + 3 decoded tokens): bit-identical logits, no index kept and,
    with `same_bytes`, the full cache's bytes (methods that keep a running statistic, such as H2O, hold more)."""
    x = ids(40)
    full, ours = KVCache(model, Full()), KVCache(model, method)
    assert torch.equal(model(x, cache=full).logits, model(x, cache=ours).logits)
    for t in (9, 10, 11):
        nxt = torch.tensor([[t]])
        assert torch.equal(model(nxt, cache=full).logits, model(nxt, cache=ours).logits)
    assert not same_bytes or ours.nbytes() == full.nbytes()
    assert ours.layers[0].store.kept_slots() is None  # nothing dropped, no index kept


@torch.no_grad()
def left_padded_batch_equals_batch_one(model, method, steps=3, ragged=False):
    """Rows of 30 and 22 tokens, the second left-padded by 8: each row's logits over the prompt and `steps`
    decoded tokens, and the tokens layer 1 keeps, equal those of the row run alone. `ragged`: the method's
    heads keep different counts (Ada-KV), so a head's index alone is padded with -1. Returns the batch cache."""
    a, b = ids(30, seed=5), ids(22, seed=6)
    singles = []
    for x in (a, b):
        c = KVCache(model, method)
        out = [model(x, cache=c).logits[:, -1]]
        for t in range(steps):
            out.append(model(torch.tensor([[11 + t]]), cache=c).logits[:, -1])
        singles.append((torch.cat(out), c.layers[1].store.kept_slots()))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    c = KVCache(model, method)
    outs = [model(batch, attention_mask=mask, cache=c).logits[:, -1]]
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        outs.append(model(torch.tensor([[11 + t]] * 2), attention_mask=mask, cache=c).logits[:, -1])
    outs = torch.stack(outs, 1)  # (2, 1 + steps, vocab)
    held = c.layers[1].store.kept_slots()
    for row, shift in ((0, 0), (1, 8)):
        assert torch.allclose(outs[row], singles[row][0], atol=1e-5), row
        kept = [sorted(s - shift for s in h.tolist() if s >= 0) for h in held[row]]
        alone = [h.tolist() for h in singles[row][1][0]]
        if ragged:
            alone = [[s for s in h if s >= 0] for h in alone]
        assert kept == alone, row  # same tokens kept as alone
    return c


# ---- generation after eviction == attention over the held tokens at their original positions --------------
_REF_MASKS = {}


def _ref_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain SDPA with a per-layer, per-KV-head boolean mask taken from _REF_MASKS."""
    m = _REF_MASKS[module.layer_idx]  # (1, H_kv, n, n)
    G = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                         attn_mask=m.repeat_interleave(G, 1), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def reference_logits(model, seq, masks):
    """Last-position logits of a plain full forward of `seq` where layer l attends under masks[l] (1, H_kv, n, n)."""
    AttentionInterface.register("evict_ref", _ref_attention)
    AttentionMaskInterface.register("evict_ref", sdpa_mask)
    _REF_MASKS.clear()
    _REF_MASKS.update(masks)
    model.set_attn_implementation("evict_ref")
    try:
        return model(seq).logits[:, -1]
    finally:
        model.set_attn_implementation(ATTN_NAME)


@torch.no_grad()
def generation_equals_attention_over_held(model, method, T=40, steps=5, seed=4):
    """Decode `steps` greedy tokens; each must equal a plain full forward of prompt + generated tokens where, in
    every layer and KV head, each generated token sees only the tokens that layer/head held before it (and
    itself), at original positions. Returns (cache, spy log)."""
    x = ids(T, seed=seed)
    cache = KVCache(model, method)
    log = spy(cache)
    logits = model(x, cache=cache).logits[:, -1]
    seq = x
    for s in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        n = T + s + 1
        masks = {}
        for layer, entries in log.items():
            H_kv = entries[0]["k"].shape[1]
            m = torch.ones(1, H_kv, n, n, dtype=torch.bool).tril()
            for i in range(T, n):  # generated token i saw what the store held after step i - T, plus itself
                held = entries[i - T]["kept"][0]
                for h in range(H_kv):
                    row = torch.zeros(n, dtype=torch.bool)
                    row[[j for j in held[h].tolist() if 0 <= j < n]] = True
                    row[i] = True
                    m[0, h, i] = row
            masks[layer] = m
        ref = reference_logits(model, seq, masks)
        logits = model(tok, cache=cache).logits[:, -1]
        assert torch.allclose(logits, ref, atol=1e-5), s
    return cache, log


def generation_equals_attention_over_kept(make_model, method, T=40, steps=5):
    """`generation_equals_attention_over_held` on a fresh model from `make_model`."""
    generation_equals_attention_over_held(make_model(), method, T=T, steps=steps)


def decode_matches_reference(model, method, T=40, steps=5, seed=4):
    """For methods that evict at prefill only: every layer and head holds, while decoding, exactly what it kept
    from the prompt plus the generated tokens, and each generated token equals attention over just those.
    Returns the cache."""
    cache, log = generation_equals_attention_over_held(model, method, T=T, steps=steps, seed=seed)
    for layer, entries in log.items():
        prompt = [[j for j in h.tolist() if j >= 0] for h in entries[0]["kept"][0]]
        for s, e in enumerate(entries):  # entry s: after prefill (s = 0) or after decoding s tokens
            held = [sorted(j for j in h.tolist() if j >= 0) for h in e["kept"][0]]
            assert held == [sorted(p + list(range(T, T + s))) for p in prompt], (layer, s)
    return cache


def kept_counts_equal_budget(model, method, budget, T=50):
    cache = KVCache(model, method)
    with torch.no_grad():
        model(ids(T, seed=2), cache=cache)
    for layer in cache.layers:
        kept = layer.store.kept_slots()
        assert kept.shape[-1] == budget and (kept >= 0).all()
        for h in range(kept.shape[1]):
            assert len(set(kept[0, h].tolist())) == budget
    return cache


@torch.no_grad()
def memory_stays_at_budget(model, method, steps=50):
    cache = KVCache(model, method)
    model(ids(40), cache=cache)
    after = cache.nbytes()
    for t in range(steps):
        model(torch.tensor([[t + 3]]), cache=cache)
        assert cache.nbytes() == after, t
    assert cache.get_seq_length() == 40 + steps and cache.full_nbytes() > 5 * after


def achieved_ratio_is_on_target(model, tok, method_cls, ratios=(2, 4, 8)):
    """On the embedded model and an 800-token passkey prompt, the ratio measured from the bytes held is within
    5% of every target `method_cls(ratio=r)` is built for."""
    from reference_impls import run_sample
    from reference_impls.data import passkey_samples

    s = passkey_samples(1, 800, seed=1, tokenizer=tok)[0]
    for ratio in ratios:
        r = run_sample(model, tok, method_cls(ratio=ratio), s["context"], s["question"], max_new_tokens=4)
        assert abs(r["achieved_ratio"] / ratio - 1) < 0.05, (ratio, r["achieved_ratio"])
