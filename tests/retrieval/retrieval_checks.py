"""Checks shared by the retrieval tests: plain references, no method code. A retrieval store holds everything and
lets each decoding query read a selection; these check that the model really read exactly that selection, that
a budget covering the row changes nothing, and that the bytes reported are the bytes selected."""

import sys
from pathlib import Path

import torch

from reference_impls import Full, KVCache

# the plain masked-attention reference and the prompt helper are the eviction tests' (one copy of each)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eviction"))
from evict_checks import ids, reference_logits  # noqa: E402,F401


def spy_select(cache):
    """Record, per layer, every select call's (step, returned mask or None, read_nbytes after it)."""
    log = {i: [] for i in range(len(cache.layers))}
    for i, layer in enumerate(cache.layers):
        orig = layer.store.select

        def wrapped(step, i=i, orig=orig, store=layer.store):
            sel = orig(step)
            log[i].append(dict(q=step.queries.clone(), k=step.keys.clone(), v=step.values.clone(),
                               pos=step.positions.clone(), scaling=step.scaling,
                               sel=None if sel is None else sel.clone(), read=store.read_nbytes()))
            return sel
        layer.store.select = wrapped
    return log


@torch.no_grad()
def decode_reads_exactly_the_selection(model, method, T=48, steps=6, seed=4):
    """Each decoded token's logits equal a plain forward of prompt + generated tokens where, in every layer and KV
    head, generated token i attends to exactly the keys that layer's select chose at that step (causal everywhere
    else). Returns (cache, select log); asserts that some step really read a strict subset."""
    x = ids(T, seed=seed)
    cache = KVCache(model, method)
    log = spy_select(cache)
    logits = model(x, cache=cache).logits[:, -1]
    seq, sparse = x, False
    for s in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        n = T + s + 1
        logits = model(tok, cache=cache).logits[:, -1]
        masks = {}
        for layer, entries in log.items():
            H_kv = entries[0]["k"].shape[1]
            m = torch.ones(1, H_kv, n, n, dtype=torch.bool).tril()
            for i in range(T, n):  # select call 1 + (i - T) chose what generated token i read
                sel = entries[1 + i - T]["sel"]
                if sel is not None:
                    m[0, :, i, : i + 1] = sel[0, :, 0]
                    sparse = sparse or not bool(sel[0, :, 0].all())
            masks[layer] = m
        ref = reference_logits(model, seq, masks)
        assert torch.allclose(logits, ref, atol=1e-5), s
    assert sparse, "no step read a strict subset: the check proved nothing"
    return cache, log


@torch.no_grad()
def budget_covering_length_is_full(model, method, T=40, steps=4):
    """A read budget >= every length reached: logits identical to the full cache's, and every step reads all."""
    x = ids(T)
    full, ours = KVCache(model, Full()), KVCache(model, method)
    log = spy_select(ours)
    assert torch.equal(model(x, cache=full).logits, model(x, cache=ours).logits)
    for t in range(steps):
        nxt = torch.tensor([[9 + t]])
        assert torch.equal(model(nxt, cache=full).logits, model(nxt, cache=ours).logits)
    assert all(e["sel"] is None for entries in log.values() for e in entries)


@torch.no_grad()
def left_padded_batch_equals_batch_one(model, method, steps=4):
    """Rows of 40 and 30 tokens, the second left-padded by 10: each row's logits over the prompt and `steps`
    decoded tokens equal those of the row run alone. Position ids skip the padding, as `generate` passes them:
    a page's min/max bounds are not invariant to a shift of RoPE positions, so the keys must be the same."""
    a, b = ids(40, seed=5), ids(30, seed=6)
    singles = []
    for x in (a, b):
        c = KVCache(model, method)
        out = [model(x, cache=c).logits[:, -1]]
        for t in range(steps):
            out.append(model(torch.tensor([[11 + t]]), cache=c).logits[:, -1])
        singles.append(torch.cat(out))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    c = KVCache(model, method)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [model(batch, attention_mask=mask, position_ids=pos, cache=c).logits[:, -1]]
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        outs.append(model(torch.tensor([[11 + t]] * 2), attention_mask=mask, position_ids=pos, cache=c).logits[:, -1])
    outs = torch.stack(outs, 1)
    for row in (0, 1):
        assert torch.allclose(outs[row], singles[row], atol=1e-5), row


def kv_bytes_of(sel, k, v):
    """Bytes of the selected keys and values, measured by gathering them: sel (H_kv, T) bool, k/v (1, H_kv, T, D)."""
    return sum(k[0, h][sel[h]].nbytes + v[0, h][sel[h]].nbytes for h in range(sel.shape[0]))


@torch.no_grad()
def read_shrinks_with_the_budget(model, make, ratios=(1.5, 3, 6), T=64, steps=3):
    """Mean bytes read per decoded token fall as the read ratio grows, and stay below the bytes held."""
    from reference_impls.generation import greedy_generate

    reads = []
    for r in ratios:
        gen = greedy_generate(model, KVCache(model, make(r)), [ids(T, seed=2)], steps)
        assert gen.read_kv_bytes < gen.kv_bytes_end, r
        reads.append(gen.read_kv_bytes)
    assert reads == sorted(reads, reverse=True) and len(set(reads)) == len(reads), reads
    return reads
