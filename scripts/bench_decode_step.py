"""What one decoding step of one layer costs each method, without the model: append, attention, after_attention.

    python scripts/bench_decode_step.py [--dtype float32] [--methods full,streamingllm,h2o] [--prompt 1441] [--steps 200]

A synthetic layer of the embedded model's shape (9 query heads, 3 KV heads, head dim 64): a prompt of `--prompt`
random tokens is compressed at 4x, then `--steps` random tokens are decoded through the store, one thread. Prints
microseconds per step for the three calls, after a warm-up. `scripts/bench_interface.py` gives the whole model's
decoding speed; this isolates the cache's share of it (the part a method's code decides), so it is steadier than the
model's figures on a noisy machine, and cheaper to rerun after a change. Run it with nothing else on the machine.
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


@torch.no_grad()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--methods", default="full,snapkv,streamingllm,h2o,tova,scissorhands,keyformer,adakv,fastgen")
    ap.add_argument("--prompt", type=int, default=1441)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {args.prompt}-token prompt at 4x, us per decoding step of one layer, "
          f"mean of {args.steps} after 20 warm-up steps, 1 thread")
    print(f"{'method':14s} {'append':>8s} {'attention':>10s} {'after':>8s} {'total':>8s}  held")
    for name in filter(None, args.methods.split(",")):
        store = (make_method("full") if name == "full" else make_method(name, 4)).new_layer(LAYERS // 2,
                                                                                        Model(num_layers=LAYERS))
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
