"""What one decoding step of one layer costs each method, without the model: append, attention, after_attention.

    python scripts/bench_decode_step.py [--dtype float32] [--methods full,streamingllm,h2o] [--prompt 1441] [--steps 200]
    python scripts/bench_decode_step.py --model [--threads 2] [--methods ...] [--steps 32]

A synthetic layer of the embedded model's shape (9 query heads, 3 KV heads, head dim 64): a prompt of `--prompt`
random tokens is compressed at 4x, then `--steps` random tokens are decoded through the store, one thread. Prints
microseconds per step for the three calls, after a warm-up. `scripts/bench_interface.py` gives the whole model's
decoding speed; this isolates the cache's share of it (the part a method's code decides), so it is steadier than the
model's figures on a noisy machine, and cheaper to rerun after a change. Run it with nothing else on the machine.

`--model` times the same calls inside the embedded model instead (by default the 1,465-token passkey prompt of
`bench_interface.py`; each store's `append` and `after_attention` in every layer, and the whole decoding step): there
the model's weights stream through the caches between two layers, so every small tensor op of a store costs
about twice what it costs in the synthetic loop, which is what the model's decoding speed sees.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

from reference_impls.base import Model, Step
from reference_impls.methods import make_method

H, H_KV, D, SCALING, LAYERS = 9, 3, 64, 0.125, 30


@torch.inference_mode()
def decode_step(store, q, k, v, seen: int, compress: bool, times: Counter) -> None:
    """One call of a layer the way `KVCache` makes it (no padding): append, attention, after_attention."""
    t0 = time.perf_counter()
    keys, values, slots = store.append(k, v)
    t1 = time.perf_counter()
    n, q_len = keys.shape[2], q.shape[2]
    positions = slots if slots is not None else torch.arange(n).expand(1, H_KV, n)
    step = Step(queries=q, keys=keys, values=values, positions=positions,
                q_positions=torch.arange(seen - q_len, seen).expand(1, q_len), scaling=SCALING, compress=compress,
                layer_idx=LAYERS // 2, since_compress=0 if compress else 1)
    dense = slots is None or (q_len == 1 and bool((slots >= 0).all()))
    step.all_visible = dense and q_len == 1
    if dense:  # the call KVCache makes for a dense step (`integration._sdpa`): SDPA's own GQA
        F.scaled_dot_product_attention(q, keys, values, scale=SCALING, enable_gqa=True)
    else:  # holes: the G query heads of a group as G queries of their KV head, masked
        F.scaled_dot_product_attention(q.view(1, H_KV, H // H_KV, D), keys, values, attn_mask=step.mask, scale=SCALING)
    t2 = time.perf_counter()
    store.after_attention(step)
    times.update(append=t1 - t0, attention=t2 - t1, after_attention=time.perf_counter() - t2)


@torch.inference_mode()
def in_model(methods: list[str], dtype: str, steps: int, prompt: int) -> None:
    """Each store's append and after_attention inside the embedded model, us per layer and step, and ms per token."""
    from reference_impls import KVCache, load_model
    from reference_impls.data import passkey_samples
    from reference_impls.generation import build_prompt

    model, tok = load_model(dtype=dtype)
    sample = passkey_samples(1, prompt, seed=0, tokenizer=tok)[0]
    ids = torch.cat(build_prompt(tok, sample["context"], sample["question"]), 1)
    print(f"{dtype}, embedded model, {ids.shape[1]}-token prompt at 4x, us per layer and decoding step (mean of "
          f"{steps} steps after 4 warm-up steps), ms per decoded token, {torch.get_num_threads()} threads")
    print(f"{'method':14s} {'append':>8s} {'after':>8s} {'ms/token':>9s}")
    for name in methods:
        cache = KVCache(model, make_method(name, 4), tok)  # full ignores the ratio
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        times = Counter()
        for layer in cache.layers:  # each store's own calls, timed where the model makes them
            for call in ("append", "after_attention"):
                def timed(*a, _f=getattr(layer.store, call), _key=call):
                    t = time.perf_counter()
                    out = _f(*a)
                    times[_key] += time.perf_counter() - t
                    return out
                setattr(layer.store, call, timed)
        for i in range(4 + steps):
            if i == 4:
                times.clear()
                t0 = time.perf_counter()
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        wall = (time.perf_counter() - t0) / steps
        us = {key: value / steps / len(cache.layers) * 1e6 for key, value in times.items()}
        print(f"{name:14s} {us['append']:8.1f} {us['after_attention']:8.1f} {wall * 1e3:9.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--methods", default="full,snapkv,streamingllm,h2o,tova,scissorhands,keyformer,adakv,fastgen")
    ap.add_argument("--prompt", type=int, help="prompt length (default 1441; with --model, 1465 as bench_interface)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", action="store_true", help="time the stores inside the embedded model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return in_model(list(filter(None, args.methods.split(","))), args.dtype, args.steps, args.prompt or 1465)
    args.prompt = args.prompt or 1441
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {args.prompt}-token prompt at 4x, us per decoding step of one layer, "
          f"mean of {args.steps} after 20 warm-up steps, {args.threads} thread(s)")
    print(f"{'method':14s} {'append':>8s} {'attention':>10s} {'after':>8s} {'total':>8s}  held")
    for name in filter(None, args.methods.split(",")):
        store = make_method(name, 4).new_layer(LAYERS // 2, Model(num_layers=LAYERS))  # full ignores the ratio
        g = torch.Generator().manual_seed(0)
        draw = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        times = Counter()
        decode_step(store, draw(1, H, args.prompt, D), draw(1, H_KV, args.prompt, D), draw(1, H_KV, args.prompt, D),
                    args.prompt, True, times)
        steps = [(draw(1, H, 1, D), draw(1, H_KV, 1, D), draw(1, H_KV, 1, D)) for _ in range(20 + args.steps)]
        for i, (q, k, v) in enumerate(steps):
            if i == 20:
                times.clear()
            decode_step(store, q, k, v, args.prompt + i + 1, False, times)
        us = {key: value / args.steps * 1e6 for key, value in times.items()}
        held = store.k.shape[-2] if store.k.dim() == 4 else f"{store.k.shape[0]} flat"
        print(f"{name:14s} {us['append']:8.1f} {us['attention']:10.1f} {us['after_attention']:8.1f} "
              f"{sum(us.values()):8.1f}  {held}")


if __name__ == "__main__":
    main()
