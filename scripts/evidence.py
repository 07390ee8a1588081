"""Accuracy / achieved ratio / times of any implemented methods on the passkey set, both settings.

    python scripts/evidence.py --methods streamingllm,snapkv --samples 30 --tokens 1500
    python scripts/evidence.py --methods kivi,kvquant --ratios 2,4,8

Writes results/<family>/<method>.json (family = the package the method lives in: eviction, quantization ...) with the config, one row per (prompt, setting, ratio) and a summary.
Methods are taxonomy ids with an implementation; every prompt is prefilled once and shared by all methods
and ratios (reference_impls.evaluate).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from reference_impls.data import passkey_samples
from reference_impls.evaluate import SETTINGS, evaluate, summarize
from reference_impls.methods import make_method, method_class
from reference_impls.models import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", required=True, help="comma-separated taxonomy ids")
    ap.add_argument("--ratios", default="1.25,1.5,2,4,8")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=0, help="skip the first prompts (to split a run across processes)")
    ap.add_argument("--stop", type=int, default=None, help="stop before this prompt index (with --first: a slice)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=None, help="folder for the JSON files (default results/<family>)")
    args = ap.parse_args()
    names = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    for n in names:
        make_method(n, ratios[0])  # fail early on an unknown method or a bad ratio
    model, tok = load_model()
    samples = passkey_samples(args.samples, args.tokens, args.seed, tokenizer=tok)
    t0 = time.time()
    families = {n: method_class(n).__module__.split(".")[1] for n in names}
    factories = {n: (lambda r, n=n: make_method(n, r)) for n in names}
    rows = []
    for i, sample in enumerate(samples):  # files rewritten after every prompt: an interrupted run keeps its data
        if i < args.first or (args.stop is not None and i >= args.stop):
            continue
        for r in evaluate(model, tok, factories, ratios, [sample], settings=args.settings.split(","),
                          progress=lambda m, i=i: print(m.replace("sample 0", f"sample {i}", 1), file=sys.stderr,
                                                        flush=True)):
            rows.append(dict(r, sample=i))
        config = {"model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)", "samples": i + 1 - args.first,
                  "first_sample": args.first, "samples_planned": args.samples, "tokens": args.tokens,
                  "seed": args.seed, "ratios": ratios, "torch": torch.__version__, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                  "wall_s": round(time.time() - t0, 1)}
        for n in names:
            out = Path(args.out or f"results/{families[n]}")
            out.mkdir(parents=True, exist_ok=True)
            mine = [r for r in rows if r["method"] == n]
            (out / f"{n}.json").write_text(json.dumps({"config": config, "summary": summarize(mine), "rows": mine},
                                                      indent=1))
    print(f"wrote {', '.join(names)} under results/", file=sys.stderr)
    for s in summarize(rows):
        print(f"{s['method']:14} {s['setting']:15} x{s['target_ratio']:<5g} achieved {s['achieved_ratio']:6.2f} "
              f"acc {s['accuracy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
