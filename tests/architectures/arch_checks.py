"""Checks shared by the architecture tests: parallel == incremental, and a plain-loop attention reference."""

import math

import torch


def step_by_step(lm, ids, chunks=None):
    """Logits of `ids` (B, T) fed through lm.step in pieces (`chunks` sizes; default one token at a time)."""
    caches, out, t = lm.new_caches(ids.shape[0]), [], 0
    for n in chunks or [1] * ids.shape[1]:
        out.append(lm.step(ids[:, t:t + n], caches))
        t += n
    return torch.cat(out, dim=1), caches


def assert_step_equals_forward(lm, T=13, B=2, chunks=None, atol=1e-5, seed=0):
    """TinyLM.forward (parallel) == TinyLM.step with caches, in fp32."""
    ids = torch.randint(0, lm.cfg.vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = lm(ids)
        inc, caches = step_by_step(lm, ids, chunks)
    torch.testing.assert_close(inc, full, atol=atol, rtol=0)
    return caches


def loop_rope(x, pos, base):
    """x (T, D), pos (T,): rotate each pair (i, i + D/2) by pos * base^(-2i/D), one scalar at a time."""
    T, D = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(D // 2):
            a = float(pos[t]) * base ** (-2 * i / D)
            x1, x2 = x[t, i].item(), x[t, i + D // 2].item()
            out[t, i], out[t, i + D // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
    return out


def loop_attention(q, k, v, q_pos, k_pos, window=None, scale=None):
    """One head: q (q, Dk), k (T, Dk), v (T, Dv); softmax over the visible keys, written as a loop."""
    scale = scale or 1 / math.sqrt(q.shape[-1])
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=q.dtype)
    for i in range(q.shape[0]):
        seen = [j for j in range(k.shape[0])
                if k_pos[j] <= q_pos[i] and (window is None or q_pos[i] - k_pos[j] < window)]
        s = torch.stack([(q[i] * k[j]).sum() * scale for j in seen])
        p = torch.exp(s - s.max())
        out[i] = sum(p[n] / p.sum() * v[j] for n, j in enumerate(seen))
    return out
