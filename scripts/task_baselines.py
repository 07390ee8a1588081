"""Full-cache scores of the bench tasks on the embedded model: the figures that decide which tasks the benchmark
keeps (a task whose full cache scores below 0.6 measures the model, not the compression).

    PYTHONPATH=. python scripts/task_baselines.py                      # every task, its default lengths, n=10
    PYTHONPATH=. python scripts/task_baselines.py --tasks passkey,code --n 5 --lengths 1500 --settings aware

Prints one row per task x length x setting: n, mean score, and how many outputs hit max_new_tokens (a cut-off
answer would score low for the wrong reason). bf16 on one CPU thread, greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from reference_impls.bench.tasks import TASKS
from reference_impls.generation import run_sample
from reference_impls.methods import make_method
from reference_impls.models import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--lengths", default="", help="comma-separated token counts; default: each task's own")
    ap.add_argument("--settings", default="aware,agnostic", help="aware (context + question prefilled together), "
                    "agnostic (context first, then the question)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outputs", default="", help="also write every output as JSONL here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the figures are quoted for one thread
    model, tok = load_model(dtype="bfloat16")
    log = open(args.outputs, "w", encoding="utf-8") if args.outputs else None
    print(f"{'task':<11} {'tokens':>6} {'setting':<8} {'n':>3} {'score':>6} {'hit limit':>9} {'s/sample':>8}")
    for name in args.tasks.split(","):
        task = TASKS[name]
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else task.lengths
        for n_tokens in lengths:
            samples = task.samples(args.n, n_tokens, seed=args.seed, tokenizer=tok)
            for setting in args.settings.split(","):
                scores, hit, t0 = [], 0, time.perf_counter()
                for x in samples:
                    r = run_sample(model, tok, make_method("full", 1), x["context"], x["question"],
                                   query_aware=setting == "aware", max_new_tokens=task.max_new_tokens,
                                   answer_prefix=x.get("answer_prefix", ""))
                    scores.append(task.score(r["answer"], x))
                    hit += r["new_tokens"] >= task.max_new_tokens
                    if log:
                        log.write(json.dumps({"task": name, "tokens": n_tokens, "setting": setting,
                                              "output": r["answer"], "reference": x["answer"],
                                              "score": scores[-1]}) + "\n")
                secs = (time.perf_counter() - t0) / len(samples)
                print(f"{name:<11} {n_tokens:>6} {setting:<8} {len(scores):>3} {sum(scores) / len(scores):>6.2f} "
                      f"{hit:>9} {secs:>8.1f}", flush=True)
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
