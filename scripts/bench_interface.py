"""The interface's tax, side by side in one process: transformers' DynamicCache against KVCache(Full) and
eviction methods at 4x, on the embedded model, a 1,465-token prompt and 32 greedy decoded tokens.

    python scripts/bench_interface.py [--threads 2] [--repeats 3] [--methods streamingllm,snapkv,h2o,tova]

Prints prefill seconds and decode tokens/s (median of the repeats) per cache and dtype, and the decode speed of
each relative to DynamicCache. Every cache decodes under `torch.inference_mode`, as `greedy_generate` does. Run it
with nothing else on the machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from reference_impls import KVCache, load_model
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt
from reference_impls.methods import make_method


@torch.inference_mode()
def run(model, ids, make_cache, new_tokens):
    cache = make_cache()
    t0 = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    prefill = time.perf_counter() - t0
    token = logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return prefill, new_tokens / (time.perf_counter() - t1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="streamingllm,snapkv,h2o,tova,knorm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes.split(","):
        model, tok = load_model(dtype=dtype)
        s = passkey_samples(1, 1465, seed=0, tokenizer=tok)[0]
        ctx, qst = build_prompt(tok, s["context"], s["question"])
        ids = torch.cat([ctx, qst], 1)
        caches = {"DynamicCache": lambda: DynamicCache(config=model.config),
                  "KVCache(full)": lambda: KVCache(model, make_method("full"))}
        for m in filter(None, args.methods.split(",")):
            caches[f"KVCache({m} 4x)"] = lambda m=m: KVCache(model, make_method(m, 4), tok)
        run(model, ids[:, :200], caches["DynamicCache"], 4)  # warm-up
        rows = {}
        for rep in range(args.repeats):  # interleaved, so drift hits every cache alike
            for name, make in caches.items():
                rows.setdefault(name, []).append(run(model, ids, make, args.new_tokens))
        base = statistics.median(r[1] for r in rows["DynamicCache"])
        print(f"\n{dtype}, {ids.shape[1]} prompt tokens, {args.new_tokens} decoded, {args.threads} threads, "
              f"median of {args.repeats}")
        print(f"{'cache':28s} {'prefill s':>10s} {'decode tok/s':>13s} {'vs DynamicCache':>16s}")
        for name, rs in rows.items():
            p, d = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
            print(f"{name:28s} {p:10.2f} {d:13.1f} {d / base:15.2f}x")


if __name__ == "__main__":
    main()
