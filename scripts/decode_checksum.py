"""Fingerprints of decoding through each method, to show that a change to the machinery left logits bit for bit.

    python scripts/decode_checksum.py [--methods streamingllm,h2o,adakv] [--dtypes float32,bfloat16] [--tokens 24]

Prefills a passkey prompt of the embedded model (1,465 tokens by default) into `KVCache(model, method at 4x)`, decodes
`--tokens` greedy tokens, and prints per method and dtype the token ids and the sum of |logits| of the last step.
Run it on two trees (e.g. `git worktree add ../before HEAD~1`, then `PYTHONPATH=../before python
scripts/decode_checksum.py ...` there) with the same thread count and diff the outputs: a refactoring that claims
"same logits" must print the same lines. One thread by default, so two trees can run side by side.
`--grad-mode no_grad` decodes under `torch.no_grad` instead of `torch.inference_mode` (what `greedy_generate` uses):
the two print the same lines.
"""

from __future__ import annotations

import argparse

import torch

from reference_impls import KVCache, load_model
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt
from reference_impls.methods import make_method


def fingerprint(model, ids: torch.Tensor, cache: KVCache, tokens: int) -> tuple[list[int], float]:
    """Greedy ids of `tokens` decoded steps and the sum of |logits| of the last one (fp32)."""
    logits = model(input_ids=ids, cache=cache).logits[:, -1:]
    out = []
    for _ in range(tokens):
        token = logits.argmax(-1)
        out.append(int(token))
        logits = model(input_ids=token, cache=cache).logits[:, -1:]
    return out, float(logits.float().abs().sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="streamingllm,h2o,tova,scissorhands,keyformer,snapkv,adakv,fastgen")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--length", type=int, default=1465, help="passkey prompt length in tokens")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grad-mode", default="inference_mode", choices=["inference_mode", "no_grad"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes.split(","):
        model, tok = load_model(dtype=dtype)
        sample = passkey_samples(1, args.length, seed=0, tokenizer=tok)[0]
        ids = torch.cat(build_prompt(tok, sample["context"], sample["question"]), 1)
        for name in filter(None, args.methods.split(",")):
            with getattr(torch, args.grad_mode)():  # full ignores the ratio
                out, checksum = fingerprint(model, ids, KVCache(model, make_method(name, args.ratio), tok), args.tokens)
            print(dtype, name, out, checksum, flush=True)


if __name__ == "__main__":
    main()
