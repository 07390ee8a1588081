"""The `kvatlas bench` command: arguments -> grid -> accuracy pass -> timing pass.

    kvatlas bench --quick                                   # every implemented method, reduced grid, <= 20 min
    kvatlas bench --methods snapkv,h2o,kivi --ratios 2,4,8 --tasks passkey,vartrack --output results/bench/x.jsonl
    kvatlas bench --methods "snapkv:window=32,kernel_size=7+kivi:bits=4" --task jsonl:my.jsonl
    kvatlas bench --shard 3/8 ...                           # job arrays: cells i, i+n, ... (full cache in each shard)
    kvatlas bench --device cuda --model meta-llama/Llama-3.1-8B-Instruct --task longbench:lcc.jsonl
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from reference_impls.methods import implemented_methods, make_method

__all__ = ["COMPOSITIONS", "QUICK", "cmd_bench", "split_methods", "parse_shard"]

#: compositions in the default grid: a prefill-time and a decode-time eviction method, each stored by KIVI
COMPOSITIONS = ("snapkv+kivi", "h2o+kivi")
#: the quick grid: every implemented method and one composition, 4x, three tasks at 1.5k tokens, 3 prompts each,
#: query-aware, one timing repeat (8.5 minutes on 2 CPU cores with 21 methods; not re-timed with 46)
QUICK = {"ratios": "4", "tasks": "passkey,multikey,docqa", "lengths": "1500", "n": 3, "settings": "query-aware",
         "repeats": 1, "compositions": ("snapkv+kivi",)}


class UsageError(ValueError):
    pass


def split_methods(text: str) -> list[str]:
    """'snapkv:window=32,kernel_size=7+kivi:bits=4,h2o' -> ['snapkv:window=32,kernel_size=7+kivi:bits=4', 'h2o']:
    a comma starts a new method unless what follows is a knob (`name=value`) of the one before."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if out and re.match(r"^\w+=", piece):
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (1 <= int(m.group(2)) and 0 <= int(m.group(1)) < int(m.group(2))):
        raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def cmd_bench(args) -> int:
    import torch

    from reference_impls.bench.run import plan
    from reference_impls.bench.tasks import TASKS, get_task

    q = QUICK if args.quick else {}
    methods = split_methods(args.methods) if args.methods else [*implemented_methods(), *q.get("compositions",
                                                                                                   COMPOSITIONS)]
    ratios_text = args.ratios or q.get("ratios", "2,4,8")
    try:
        ratios = [float(r) for r in ratios_text.split(",")]
    except ValueError:
        raise UsageError(f"--ratios {ratios_text!r}: expected numbers such as 2,4,8") from None
    names = [t for t in (args.tasks or q.get("tasks") or ",".join(TASKS)).split(",") if t] + list(args.task or [])
    try:
        tasks = {get_task(t).name: get_task(t) for t in names}
        for m in methods:  # fail before loading a model on an unknown id, knob or ratio
            for r in ratios:
                make_method(m, r)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    lengths_text = args.lengths or q.get("lengths")
    lengths = None
    if lengths_text:
        try:
            ls = tuple(int(x) for x in lengths_text.split(","))
        except ValueError:
            raise UsageError(f"--lengths {lengths_text!r}: expected token counts such as 1000,2000") from None
        lengths = {t: ls for t in tasks}
    settings = (args.settings or q.get("settings") or "query-aware").split(",")
    try:
        cells = plan(methods, ratios, tasks, settings, lengths)
    except ValueError as err:
        raise UsageError(str(err)) from None
    i, n_shards = parse_shard(args.shard)
    out = Path(args.output or ("results/bench/quick.jsonl" if args.quick else "results/bench/grid.jsonl"))
    if n_shards > 1:  # each shard its own files; the full cache runs in every shard (it decides which tasks count)
        others = [c for c in cells if c.method != "full"][i::n_shards]
        cells = [c for c in cells if c.method == "full" and any(o.group == c.group for o in others)] + others
        out = out.with_name(f"{out.stem}.shard{i}of{n_shards}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = args.n if args.n is not None else q.get("n", 10)
    repeats = args.repeats if args.repeats is not None else q.get("repeats", 3)

    threads = torch.get_num_threads()
    if args.threads:  # parallel shards on one machine: one thread each, or OpenMP's spinning makes both crawl
        torch.set_num_threads(args.threads)
    try:
        return _run(args, cells, tasks, out, n, repeats)
    finally:
        torch.set_num_threads(threads)  # the command may run inside a longer process (tests, notebooks)


def _run(args, cells, tasks, out, n, repeats) -> int:
    import torch
    from tqdm import tqdm

    from reference_impls.bench.run import Bench, git_commit, run_accuracy, timing_pass
    from reference_impls.models import load_model

    dtype = args.dtype
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    device = str(next(model.parameters()).device)
    info = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "dtype": dtype, "device": device,
            "batch_size": 1, "threads": torch.get_num_threads(), "commit": git_commit(),
            "command": "kvatlas bench " + " ".join(shlex.quote(a) for a in (args.argv or []))}
    bench = Bench(model, tok, tasks, out, n=n, seed=args.seed, min_full_score=args.min_full_score, info=info)
    print(f"kvatlas bench: {len(cells)} cells x {n} prompts -> {out} (resumes if it exists)", file=sys.stderr)
    if not args.timing_only:
        with tqdm(total=len(cells) * n, desc="accuracy", unit="run", file=sys.stderr) as bar:
            run_accuracy(bench, cells, progress=bar.update)
    if not args.no_timing:
        with tqdm(total=len(cells), desc="timing", unit="cell", file=sys.stderr) as bar:
            timing_pass(bench, cells, repeats=repeats, progress=bar.update)
    print(f"kvatlas bench: wrote {out} and {bench.sidecar}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="the apples-to-apples benchmark: methods x ratios x tasks x settings",
                       description="Every method x target ratio x task x setting on one model, batch, dtype and "
                       "machine; one JSON line per cell (score, the full cache's score, measured bytes in the 16-bit "
                       "unit, times, provenance), per-sample answers in <output>.samples.jsonl. Rerunning resumes.")
    p.add_argument("--quick", action="store_true", help="every implemented method and snapkv+kivi on a reduced grid "
                   "(4x; passkey, multikey, docqa at 1.5k tokens; 3 prompts; query-aware; one timing repeat): "
                   "8.5 minutes on 2 CPU cores when it covered 21 methods (not re-timed since)")
    p.add_argument("--methods", help="comma-separated method strings as `generate` takes them (knobs and "
                   "compositions); default: every implemented method plus " + ", ".join(COMPOSITIONS))
    p.add_argument("--ratios", help="target ratios against a 16-bit cache (default 2,4,8)")
    p.add_argument("--tasks", help="comma-separated built-in tasks (default: all)")
    p.add_argument("--task", action="append", help="a user task: jsonl:PATH, longbench:PATH or ruler:PATH "
                   "(repeatable)")
    p.add_argument("--lengths", help="prompt lengths in tokens for every task (default: each task's own)")
    p.add_argument("--settings", help="query-aware,query-agnostic (default query-aware)")
    p.add_argument("--n", type=int, default=None, help="prompts per cell (default 10; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default 0)")
    p.add_argument("--min-full-score", type=float, default=0.6, help="drop a task where the full cache scores "
                   "below this (default 0.6)")
    p.add_argument("--output", help="cells file (default results/bench/grid.jsonl, quick: results/bench/quick.jsonl)")
    p.add_argument("--shard", help="i/n: run cells i, i+n, ... into <output>.shard<i>of<n>.jsonl")
    p.add_argument("--model", default=None, help="HF id or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, or auto (accelerate's device_map='auto')")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 per process when "
                   "shards share a machine)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-timing", action="store_true", help="skip the timing pass (e.g. in parallel shards)")
    g.add_argument("--timing-only", action="store_true", help="only the timing pass, over finished cells; run it "
                   "with nothing else on the machine")
    p.set_defaults(func=cmd_bench)
