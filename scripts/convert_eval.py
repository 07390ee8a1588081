"""Post-training conversions of the embedded SmolLM2-135M-Instruct (bf16), measured before any fine-tuning: GQA 3 -> 1
KV heads by mean-pooling, partial RoPE alone, and MHA -> MLA (MHA2MLA's SVD_joint of the weights; TransMLA-style PCA of
calibration states) at three latent ranks. One JSON line per configuration, with the command that made it:

    OMP_NUM_THREADS=1 python scripts/convert_eval.py     # all 14 configurations: 26 min, 1 thread of a busy 2-core box
    OMP_NUM_THREADS=1 python scripts/convert_eval.py --configs original,gqa-1 --output /tmp/c.jsonl

Per configuration: perplexity of 2048 tokens of standard-library docstrings (`reference_impls.data`'s prose, tokens
4096-6144 of it: the calibration prefills read its first 1024), the KV bytes per token measured from the cache's
held tensors after that prefill (and its closed form), and passkey accuracy (`passkey_samples`, n = 10, ~1k tokens,
query-aware, 16 new tokens). Rows of configurations not run are kept; rows of those run are replaced.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from reference_impls import Full, KVCache
from reference_impls.architectures import convert_gqa, convert_mla
from reference_impls.architectures.convert_gqa import pool_kv_heads
from reference_impls.architectures.convert_mla import MLALatent, frequency_pairs, norm_pairs, partial_rope
from reference_impls.bench.run import git_commit
from reference_impls.data import haystack_sentences, is_correct, passkey_samples
from reference_impls.generation import run_sample
from reference_impls.integration import model_info
from reference_impls.models import load_model

OUTPUT = "results/architectures/conversions.jsonl"
N_PAIRS = 4  # RoPE kept on 8 of 64 dims per head: D/8, the share MHA2MLA keeps (16 of Llama-2's 128)
# name -> (conversion, params): ranks 96/48/24 = MHA2MLA's d_kv 32/16/8 per KV head (x 3 KV heads)
CONFIGS = {
    "original": ("none", {}),
    "gqa-1": ("gqa", {"n_kv_heads": 1}),
    "partial-rope-2norm": ("partial-rope", {"strategy": "2-norm", "n_pairs": N_PAIRS}),
    "partial-rope-low": ("partial-rope", {"strategy": "low", "n_pairs": N_PAIRS}),
    "partial-rope-high": ("partial-rope", {"strategy": "high", "n_pairs": N_PAIRS}),
    **{f"mha2mla-r{r}": ("mha2mla", {"strategy": "2-norm", "n_pairs": N_PAIRS, "rank": r, "basis": "svd"})
       for r in (96, 48, 24)},
    **{f"transmla-r{r}": ("transmla", {"strategy": "2-norm", "n_pairs": N_PAIRS, "rank": r, "basis": "pca",
                                       "balance": True}) for r in (96, 48, 24)},
    # RoPE on the 16 fastest pairs (half the dims): the partial RoPE that loses least here; rank 32 gives the bytes
    # of GQA 3 -> 1 (128 of 384 numbers per token and layer), rank 96 half the full cache
    "partial-rope-high16": ("partial-rope", {"strategy": "high", "n_pairs": 16}),
    **{f"transmla-high16-r{r}": ("transmla", {"strategy": "high", "n_pairs": 16, "rank": r, "basis": "pca",
                                              "balance": True}) for r in (96, 32)},
}
NO_PASSKEY = ("partial-rope-low", "partial-rope-high")  # strategy ablations: perplexity only, to keep the run short


def build(name: str, model, tok):
    """(converted model, KV method, closed-form bytes per token) of one configuration."""
    conversion, p = CONFIGS[name]
    cfg = model.config
    L, H_kv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if conversion == "none":
        return model, Full(), convert_gqa.bytes_per_token(L, H_kv, D)
    if conversion == "gqa":
        return pool_kv_heads(model, p["n_kv_heads"]), Full(), convert_gqa.bytes_per_token(L, p["n_kv_heads"], D)
    if p["strategy"] == "2-norm":
        pairs = norm_pairs(model_info(model, tok).calibration("stdlib", 1024), p["n_pairs"])
    else:
        pairs = frequency_pairs(p["strategy"], p["n_pairs"], D, L)
    converted = partial_rope(model, pairs)
    if conversion == "partial-rope":
        return converted, Full(), convert_gqa.bytes_per_token(L, H_kv, D)
    method = MLALatent(rank=p["rank"], pairs=pairs, basis=p["basis"], balance=p.get("balance", False))
    return converted, method, convert_mla.bytes_per_token(L, p["rank"], H_kv, p["n_pairs"])


@torch.no_grad()
def perplexity(model, method, tok, ids) -> tuple[float, float]:
    """(perplexity of ids (1, T) in one prefill through KVCache, bytes per token the cache holds after it)."""
    cache = KVCache(model, method, tok)  # with the tokenizer: calibration reads docstrings, not random tokens
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits.float()
    nll = -torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).mean()
    return float(nll.exp()), cache.nbytes() / ids.shape[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    ap.add_argument("--output", default=OUTPUT)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--passkey-n", type=int, default=10)
    ap.add_argument("--passkey-tokens", type=int, default=1000)
    args = ap.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        print(f"convert_eval: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    model, tok = load_model(dtype="bfloat16")
    ids = tok(" ".join(haystack_sentences()), add_special_tokens=False, return_tensors="pt").input_ids
    ids = ids[:, 4096:4096 + args.ppl_tokens]
    samples = passkey_samples(args.passkey_n, args.passkey_tokens, seed=0, tokenizer=tok)
    info = {"model": "SmolLM2-135M-Instruct (embedded)", "dtype": "bfloat16", "device": "cpu",
            "threads": torch.get_num_threads(), "commit": git_commit(),
            "command": "python scripts/convert_eval.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    out = Path(args.output)
    rows = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    cfg = model.config
    full_bpt = convert_gqa.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    for name in names:
        t0 = time.perf_counter()
        converted, method, closed = build(name, model, tok)
        ppl, bpt = perplexity(converted, method, tok, ids)
        answers = []
        if name not in NO_PASSKEY:
            for s in samples:
                r = run_sample(converted, tok, method, s["context"], s["question"], query_aware=True,
                               max_new_tokens=16, answer_prefix=s["answer_prefix"])
                answers.append(r["answer"])
        hits = [is_correct(a, s["answer"]) for a, s in zip(answers, samples)]
        conversion, params = CONFIGS[name]
        rows[name] = {"config": name, "conversion": conversion, "params": params,
                      "kv_bytes_per_token": bpt, "closed_form_bytes_per_token": closed,
                      "full_bytes_per_token": full_bpt, "kv_fraction": bpt / full_bpt,
                      "ppl": ppl, "ppl_tokens": int(ids.shape[1]),
                      "ppl_text": "standard-library docstrings (reference_impls.data.haystack_sentences), tokens 4096+",
                      "passkey": sum(hits) / len(hits) if hits else None, "passkey_n": len(hits),
                      "passkey_tokens": args.passkey_tokens, "passkey_answers": answers,
                      "passkey_expected": [s["answer"] for s in samples] if hits else [],
                      "seconds": round(time.perf_counter() - t0, 1), **info,
                      "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        print(f"{name:20} {bpt:8.0f} B/token (closed form {closed})  ppl {ppl:10.2f}  passkey "
              f"{rows[name]['passkey']}  {rows[name]['seconds']} s", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")  # after every configuration: a long run keeps what it measured
        tmp.write_text("".join(json.dumps(rows[k]) + "\n" for k in CONFIGS if k in rows))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
