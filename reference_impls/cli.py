"""The `kvatlas` command: list, validate, cite, export, new, schema, generate, arch-bench.

Bad input gets one line on stderr naming the file, field or parameter, and a non-zero exit; never a
traceback. `generate` writes its output only when every input line has been answered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["main"]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ list
def _records(filters: argparse.Namespace) -> list[dict]:
    from reference_impls.atlas.validate import load_entries

    entries, problems = load_entries(check_links=False)
    if problems:
        raise UsageError(f"the taxonomy has {len(problems)} invalid entries; run `kvatlas validate` (first: {problems[0]})")
    out = []
    for e in entries:
        rec = {"id": e.id, "name": e.name, "title": e.title, "principle": e.principle, "also": e.also,
               "dimensions": e.dimensions, "training": e.training, "phase": e.phase, "year": e.year,
               "venue": e.venue, "arxiv": e.arxiv, "query_aware": e.query_aware, "budget_policy": e.budget_policy,
               "benchmark_category": e.benchmark_category, "implemented": e.implementation is not None,
               "implementation": e.implementation, "notebook": e.notebook, "code": e.code, "url": e.url}
        if filters.principle and filters.principle not in [e.principle, *e.also]:
            continue
        if filters.dimension and filters.dimension not in e.dimensions:
            continue
        if filters.training and filters.training != e.training:
            continue
        if filters.phase and filters.phase != e.phase:
            continue
        if filters.implemented is not None and rec["implemented"] != filters.implemented:
            continue
        out.append(rec)
    return out


def cmd_list(args) -> int:
    from reference_impls.atlas.schema import VOCAB

    for field, key in (("principle", "principle"), ("dimension", "dimensions"), ("training", "training"),
                       ("phase", "phase")):
        value = getattr(args, field)
        if value is not None and value not in VOCAB[key]:
            raise UsageError(f"--{field} {value!r} is not allowed; allowed values: {', '.join(VOCAB[key])}")
    recs = _records(args)
    if args.json:
        json.dump(recs, sys.stdout, indent=1)
        print()
        return 0
    for r in recs:
        mark = "*" if r["implemented"] else " "
        print(f"{mark} {r['id']:<28} {r['principle']:<20} {','.join(r['dimensions']):<18} {r['training']:<14} "
              f"{r['year']}  {r['arxiv'] or '-'}")
    print(f"{len(recs)} entries ({sum(r['implemented'] for r in recs)} implemented, marked *)", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------- validate
def cmd_validate(args) -> int:
    from reference_impls.atlas.validate import entry_files, load_entries

    paths = [Path(p) for p in args.paths] if args.paths else entry_files()
    for p in paths:
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
    entries, problems = load_entries(paths, warnings=True)
    for prob in problems:
        print(prob)
    errors = [p for p in problems if p.level == "error"]
    bad = len({p.file for p in errors})
    warned = len(problems) - len(errors)
    print(f"{len(paths)} entries checked: {len(paths) - bad} valid, {bad} with problems"
          + (f" ({warned} warnings)" if warned else ""), file=sys.stderr)
    return 1 if errors else 0


# ------------------------------------------------------------------------------------------------ cite
def cmd_cite(args) -> int:
    from reference_impls.atlas.validate import entry_files, load_entries

    if args.all == bool(args.id):
        raise UsageError("cite takes an entry id or --all")
    if args.all:
        entries, problems = load_entries(check_links=False)
        print("\n".join(e.bibtex.strip() + "\n" for e in entries), end="")
        return 1 if problems else 0
    path = next((p for p in entry_files() if p.stem == args.id), None)
    if path is None:
        raise UsageError(f"no taxonomy entry {args.id!r}; see `kvatlas list`")
    entries, problems = load_entries([path], check_links=False)
    if problems:
        raise UsageError(str(problems[0]))
    print(entries[0].bibtex.strip())
    return 0


# ---------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from reference_impls.atlas import export
    from reference_impls.atlas.validate import load_entries

    if args.results and args.format != "csv":
        raise UsageError("--results goes with --format csv (one row per reported result)")
    out = Path(args.output) if args.output else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--output {out}: folder {out.parent} does not exist")
    entries, problems = load_entries(check_links=False)
    if problems:
        raise UsageError(f"the taxonomy has {len(problems)} problems; run `kvatlas validate` (first: {problems[0]})")
    write = {"json": export.to_json, "csv": export.to_results_csv if args.results else export.to_csv,
             "bibtex": export.to_bibtex}[args.format]
    text = write(entries)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        n_results = sum(len(e.reported_results) for e in entries)
        what = f"{n_results} reported results of {len(entries)} entries" if args.results else f"{len(entries)} entries"
        print(f"wrote {what} to {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------- new
def cmd_new(args) -> int:
    from reference_impls.atlas.scaffold import scaffold

    try:
        paths = scaffold(args.id, args.principle)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for path in paths:
        print(f"created {path}")
    return 0


# ---------------------------------------------------------------------------------------------- schema
def cmd_schema(args) -> int:
    from reference_impls.atlas.paths import taxonomy_dir
    from reference_impls.atlas.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    path = taxonomy_dir() / "schema.json"
    if args.check:
        if not path.is_file() or path.read_text() != text:
            raise UsageError(f"{path} is out of date; run `kvatlas schema`")
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------- generate
def _read_prompts(path: str) -> list[dict]:
    from reference_impls.bench.readers import json_lines

    try:
        lines = json_lines(path, what="prompts")
    except ValueError as err:
        raise UsageError(f"--input {err}") from None
    for n, row in lines:
        for field in ("context", "question"):
            if not isinstance(row.get(field), str):
                raise UsageError(f"{path}:{n}: {field}: required string field is missing")
        if not isinstance(row.get("answer_prefix", ""), str):
            raise UsageError(f"{path}:{n}: answer_prefix: must be a string")
    return [row for _, row in lines]


def cmd_generate(args) -> int:
    from reference_impls.methods import make_method

    if args.ratio < 1:
        raise UsageError(f"--ratio {args.ratio} must be >= 1 (full-cache bytes over compressed bytes; 2 = half)")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    try:
        make_method(args.method, args.ratio)  # validate the configuration before loading a model
    except (ValueError, NotImplementedError) as err:
        raise UsageError(f"--method {args.method} --ratio {args.ratio}: {err}") from None
    prompts = _read_prompts(args.input)
    out = Path(args.output)
    if not out.parent.exists():
        raise UsageError(f"--output {out}: folder {out.parent} does not exist")

    from tqdm import tqdm

    from reference_impls.generation import run_sample
    from reference_impls.models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in tqdm(prompts, desc=f"{args.method} x{args.ratio:g}", unit="prompt", file=sys.stderr):
                res = run_sample(model, tokenizer, make_method(args.method, args.ratio), row["context"],
                                 row["question"], query_aware=args.query_aware, max_new_tokens=args.max_new_tokens,
                                 answer_prefix=row.get("answer_prefix", ""))
                # an input's gold `answer` is kept as `expected`; `answer` becomes the model's
                gold = {"expected": row["answer"]} if "answer" in row else {}
                f.write(json.dumps({**row, **gold, **res, "method": args.method, "target_ratio": args.ratio,
                                    "query_aware": args.query_aware}) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return 0


def cmd_passkey(args) -> int:
    from reference_impls.data import passkey_samples
    from reference_impls.models import load_model

    tokenizer = load_model(args.model)[1] if args.exact_tokens else None
    with open(args.output, "w", encoding="utf-8") as f:
        for s in passkey_samples(args.n, args.tokens, args.seed, tokenizer=tokenizer):
            f.write(json.dumps(s) + "\n")
    print(f"wrote {args.n} passkey prompts of ~{args.tokens} tokens to {args.output}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    """Accuracy of a generate output whose lines carry the expected `answer` (exact digits contained)."""
    path = Path(args.answers)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    missing = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get("answer"), str) or "expected" not in r]
    if not rows or missing:
        raise UsageError(f"{path}: needs lines with answer and expected fields (bad lines: {missing[:5]})")
    ok = sum(str(r["expected"]) in r["answer"] for r in rows)
    ratios = [r["achieved_ratio"] for r in rows if "achieved_ratio" in r]
    print(json.dumps({"n": len(rows), "correct": ok, "accuracy": ok / len(rows),
                      "achieved_ratio": sum(ratios) / len(ratios) if ratios else None}))
    return 0


# ------------------------------------------------------------------------------------------ arch-bench
def cmd_arch_bench(args) -> int:
    """Train (or load from the cache) each architecture on the synthetic suite and write one JSON line each.

    Lines already in --output for other architectures are kept; an architecture's line is replaced when it is
    rerun, and the file is rewritten after each architecture (atomically), so a long run can be resumed."""
    import datetime
    import shlex

    import torch

    from reference_impls.architectures.trainer import ARCHS, TrainConfig

    archs = [a.strip() for a in (args.archs or ",".join(ARCHS)).split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise UsageError(f"--archs {args.archs!r}: unknown {', '.join(unknown) or '(none given)'}; allowed: "
                         f"{', '.join(ARCHS)}")
    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be >= 1")
    try:
        tc = TrainConfig(**{k: v for k, v in (("steps", args.steps), ("length", args.length), ("seed", args.seed),
                                                          ("eval_n", args.eval_n))
                            if v is not None})
    except ValueError as err:
        field = str(err).split("=")[0]  # TrainConfig names the field first: "length=40 must be >= 48 ..."
        raise UsageError(f"--{field.replace('_', '-')} {getattr(args, field, '')}: {err}") from None
    out = Path(args.output)
    rows = {}
    if out.exists():
        for n, line in enumerate(out.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                raise UsageError(f"--output {out}:{n}: not a JSON line; fix or remove the file") from None
            if row is not None:
                rows[row.get("arch")] = row
    out.parent.mkdir(parents=True, exist_ok=True)

    from reference_impls.architectures.trainer import bench_row
    from reference_impls.bench.run import git_commit

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "kvatlas arch-bench " + " ".join(shlex.quote(a) for a in (args.argv or []))
    commit = git_commit()  # the code that runs: read once, before a long run during which the checkout may move
    try:
        for arch in archs:
            print(f"kvatlas arch-bench: {arch}: {tc.steps} steps at length {tc.length} (cached runs load)",
                  file=sys.stderr)
            try:
                row = bench_row(arch, tc)
            except (ImportError, NotImplementedError) as err:
                raise UsageError(f"--archs {arch}: not available here ({err})") from None
            rows[arch] = {**row, "threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
                          "commit": commit, "command": command,
                          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            acc = ", ".join(f"{t} {v[str(tc.length)]:.2f}" for t, v in row["accuracy"].items())
            print(f"kvatlas arch-bench: {arch}: {row['params']} params, {row['bytes_per_token'][str(tc.length)]:g} "
                  f"B/token at {tc.length}, accuracy at {tc.length}: {acc}; train {row['train_s']:.0f} s"
                  + (" (cached)" if row["cached"] else "") + f", eval {row['eval_s']:.0f} s", file=sys.stderr)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows.values())
            os.replace(tmp, out)
    finally:
        torch.set_num_threads(threads)
    print(f"kvatlas arch-bench: wrote {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvatlas", description="The reference atlas of KV-cache compression.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list taxonomy entries")
    p.add_argument("--json", action="store_true", help="one JSON record per entry")
    p.add_argument("--principle")
    p.add_argument("--dimension")
    p.add_argument("--training")
    p.add_argument("--phase")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--implemented", dest="implemented", action="store_true", default=None)
    g.add_argument("--not-implemented", dest="implemented", action="store_false")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("validate", help="validate taxonomy entries (default: all of taxonomy/)")
    p.add_argument("paths", nargs="*")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("cite", help="print an entry's BibTeX (or --all)")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_cite)

    p = sub.add_parser("export", help="the whole atlas as one JSON, CSV or BibTeX file (stdout by default)")
    p.add_argument("--format", required=True, choices=["json", "csv", "bibtex"])
    p.add_argument("--results", action="store_true", help="with --format csv: one row per reported result")
    p.add_argument("--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("new", help="scaffold a new method: entry, implementation stub, test, notebook")
    p.add_argument("id")
    p.add_argument("--principle", required=True)
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("schema", help="write taxonomy/schema.json (JSON Schema for editors)")
    p.add_argument("--check", action="store_true", help="fail if schema.json is out of date")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("generate", help="answer prompts with a compressed cache")
    p.add_argument("--method", required=True, help="id[:knob=value,...][+id[:knob=value,...]], e.g. "
                   "'snapkv:window=32,pooling=max+kivi:bits=4' (an eviction method composed with a quantizer)")
    p.add_argument("--ratio", type=float, default=1.0, help="target bytes of a full 16-bit cache / bytes held (2 = "
                   "half); configures only what the method string leaves unset")
    p.add_argument("--query-aware", action="store_true", help="compress after the question is in the prefix")
    p.add_argument("--model", default=None, help="HF id or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (default bfloat16; ratios always count against a 16-bit cache, so an "
                   "fp32 full cache reports 0.5x)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--input", required=True, help="JSONL with context, question (and optional answer_prefix)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="accuracy of a generate output (lines with answer and expected)")
    p.add_argument("answers")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("passkey", help="write a synthetic passkey prompt set (JSONL)")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--exact-tokens", action="store_true", help="measure lengths with the model's tokenizer")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_passkey)

    p = sub.add_parser("arch-bench", help="train the tiny architectures on the synthetic suite; one JSON line each",
                       description="Every architecture under reference_impls.architectures at the same parameter "
                       "budget, steps, optimiser and seed on the synthetic suite (associative recall, selective "
                       "copying, passkey); accuracy at L/2, L, 2L, 4L and the cache bytes measured from held "
                       "tensors. Trained weights are cached under $KVATLAS_CACHE/architectures/. The nine at the "
                       "defaults: 13 min wall with --threads 1 on a shared 2-core machine (8 min CPU; Mamba the "
                       "slowest, 3 min CPU to train, the others about 35 s).")
    p.add_argument("--archs", help="comma-separated architectures (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the trainer's)")
    p.add_argument("--length", type=int, default=None, help="training length L (default: the trainer's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights and the data (default 0)")
    p.add_argument("--eval-n", type=int, default=None, help="sequences per task and length (default: the trainer's)")
    p.add_argument("--output", default="results/architectures/bench.jsonl", help="JSON lines, one per architecture; "
                   "lines of architectures not rerun are kept (default: results/architectures/bench.jsonl)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_arch_bench)

    from reference_impls.bench.command import add_parser as add_bench

    add_bench(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv[1:]  # recorded by `bench` as the command that made its rows
    from reference_impls.bench.command import UsageError as BenchUsageError
    from reference_impls.models import ModelNotAvailable

    try:
        return args.func(args)
    except (UsageError, BenchUsageError, ModelNotAvailable) as err:
        print(f"kvatlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
