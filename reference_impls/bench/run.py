"""`kvatlas bench`: every method x target ratio x task x length x setting on one model, batch, dtype and machine.

What makes the comparison apples-to-apples (and what the benchmark seed, arXiv 2407.01527, did not measure):
the same prompts, the same prefill (each prompt is prefilled once and every method compresses from that
record, `reference_impls.replay`), batch size 1, greedy decoding, and ratios **achieved** from the bytes each
cache holds, counted against a full 16-bit cache (`base.UNIT_BYTES`, the seeds' unit) whatever the model's
dtype. The model runs in bf16 by default.

Cells and files:

* A cell is (method string, target ratio, task, length, setting). Its JSON line carries the mean score over
  its samples, the full cache's score on the same samples (`full_score`), bytes (kept, full, peak), times and
  the provenance (model, dtype, device, commit, command). The full cache runs first in every (task, length,
  setting); a task whose full-cache score is below `min_full_score` is dropped there (its full row says so).
* Per-sample answers go to a sidecar (`<output stem>.samples.jsonl`), appended as they finish; the cell file
  is rewritten atomically whenever a cell completes. Running the same command again resumes: finished cells
  are skipped, and samples already in the sidecar are not redone.
* Timings: the accuracy pass records its times (flagged as taken on shared cores). The timing pass
  (`timing_pass`) runs each (method, ratio, length, setting) alone on one prompt, decoding a fixed number of
  tokens, and overwrites the times with medians of repeats.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from reference_impls.bench.metrics import first_line
from reference_impls.generation import build_prompt, eos_ids, greedy_generate, shorten_prompt
from reference_impls.integration import KVCache, model_info
from reference_impls.methods import make_method, method_class, parse_method
from reference_impls.replay import cache_from_record, record_prefill

__all__ = ["Cell", "Bench", "SETTINGS", "git_commit", "plan", "read_rows", "run_accuracy", "timing_pass", "write_rows"]

SETTINGS = ("query-aware", "query-agnostic")


@dataclass(frozen=True)
class Cell:
    method: str
    ratio: float
    task: str
    length: int
    setting: str

    @property
    def key(self) -> str:
        return f"{self.method}|{self.ratio:g}|{self.task}|{self.length}|{self.setting}"

    @property
    def group(self) -> tuple[str, int, str]:  # cells sharing prompts and prefills
        return self.task, self.length, self.setting


def plan(methods: Iterable[str], ratios: Iterable[float], tasks: dict, settings: Iterable[str],
         lengths: Optional[dict[str, tuple[int, ...]]] = None) -> list[Cell]:
    """The grid, the full cache first in every group (once, at ratio 1, whatever the ratios)."""
    methods, ratios, settings = list(methods), [float(r) for r in ratios], list(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"--settings: unknown {bad}; allowed: {', '.join(SETTINGS)}")
    if not methods or not ratios or not tasks or not settings:
        raise ValueError("the grid is empty: give at least one method, ratio, task and setting")
    for r in ratios:
        if not r >= 1:
            raise ValueError(f"--ratios: a target ratio must be >= 1, got {r:g}")
    cells = []
    for name, task in tasks.items():
        for length in (lengths or {}).get(name) or task.lengths:
            for setting in settings:
                cells.append(Cell("full", 1.0, name, length, setting))
                cells += [Cell(m, r, name, length, setting) for m in methods if m != "full" for r in ratios]
    return cells


def _family(spec: str) -> tuple[list[str], str]:
    ids = [mid for mid, _ in parse_method(spec)]
    fams = [method_class(i).__module__.split(".")[1] for i in ids]
    return ids, " + ".join(fams)


def _params(method) -> dict:
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.repr}
        return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)
    return plain(method)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of `path` (none if it does not exist); a bad line is an error naming file and line."""
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not a JSON line ({err.msg})") from None
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Bench:
    """One run's fixed setup and its files."""

    model: object
    tokenizer: object
    tasks: dict  # name -> Task
    output: Path
    n: int = 10
    seed: int = 0
    min_full_score: float = 0.6
    info: dict = dataclasses.field(default_factory=dict)  # model, dtype, device, command ... copied into each row

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.stem + ".samples.jsonl")

    def samples(self, task: str, length: int) -> list[dict]:
        key = (task, length)
        memo = self.__dict__.setdefault("_samples", {})
        if key not in memo:
            memo[key] = self.tasks[task].samples(self.n, length, seed=self.seed, tokenizer=self.tokenizer)
        return memo[key]

    # one cell row from its sample records ----------------------------------------------------------------
    def cell_row(self, cell: Cell, recs: list[dict], full: Optional[dict]) -> dict:
        task = self.tasks[cell.task]
        ids, family = _family(cell.method)
        method = make_method(cell.method, cell.ratio)
        mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
        dec = [r["decode_tokens_per_s"] for r in recs if r["decode_tokens_per_s"]]
        row = {
            "method": cell.method, "label": " + ".join(ids), "ids": ids, "family": family,
            "params": _params(method), "target_ratio": cell.ratio,
            "achieved_ratio": round(mean("full_kv_bytes") / mean("kv_bytes"), 4),
            "task": cell.task, "category": task.category, "metric": task.metric, "length": cell.length,
            "prompt_tokens": round(mean("prompt_tokens"), 1), "setting": cell.setting,
            "score": round(mean("score"), 4), "full_score": full["score"] if full else None,
            "n": len(recs), "hit_limit": sum(r["hit_limit"] for r in recs),
            "kv_bytes": round(mean("kv_bytes")), "full_kv_bytes": round(mean("full_kv_bytes")),
            "peak_kv_bytes": max(r["peak_kv_bytes"] for r in recs),
            "prefill_s": round(mean("prefill_s"), 4), "compress_s": round(mean("compress_s"), 4),
            "decode_tokens_per_s": round(statistics.median(dec), 2) if dec else None,
            "timing": "accuracy pass (shared cores)", **self.info,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        read = [r["read_kv_bytes"] for r in recs if r.get("read_kv_bytes") is not None]
        if read:  # a retrieval method: holds kv_bytes, reads this much per decoded token
            row["read_kv_bytes"] = round(sum(read) / len(read))
        if cell.method == "full" and row["score"] < self.min_full_score:
            row["dropped"] = f"full-cache score {row['score']:.2f} < {self.min_full_score:g}: task not benchmarked"
        return row


_NEWLINES: dict[int, frozenset] = {}


def first_line_stop(tokenizer) -> Callable[[list[int]], bool]:
    """True once the output holds a complete first line (a newline after some text that is not a code fence):
    for tasks that score only the first line, the tokens after it cost time and change nothing."""
    if id(tokenizer) not in _NEWLINES:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _NEWLINES[id(tokenizer)] = frozenset(i for i, t in enumerate(vocab)
                                             if "\n" in tokenizer.convert_tokens_to_string([t]))
    nl = _NEWLINES[id(tokenizer)]
    return lambda toks: toks[-1] in nl and bool(first_line(tokenizer.decode(toks, skip_special_tokens=True)))


@torch.no_grad()
def run_sample(model, tokenizer, method, record, ctx, qst, aware: bool, max_new_tokens: int, eos: set[int],
               decode_all: bool = False, stop: Optional[Callable] = None) -> tuple[str, dict]:
    """One method on one recorded prompt: (answer text, measurements). `decode_all`: ignore EOS and `stop`
    (the timing pass decodes a fixed number of tokens)."""
    t0 = time.perf_counter()
    short, elided = shorten_prompt(method, ctx, qst, aware, model_info(model, tokenizer))
    if not method.replayable:  # its prompt attends differently from the record's: prefilled live
        cache = KVCache(model, method, tokenizer)
        cache.elided = elided
        compress_s = time.perf_counter() - t0
        gen = greedy_generate(model, cache, [torch.cat([short, qst], dim=1)] if aware else [short, qst],
                              max_new_tokens, set() if decode_all else eos, stop=None if decode_all else stop)
        record = dataclasses.replace(record, seconds=0.0)  # the live prefill's time is in gen.prefill_s
    else:
        if elided:  # prompt compression: the shorter prompt is prefilled instead of the shared record
            record = record_prefill(model, torch.cat([short, qst], dim=1) if aware else short)
        cache = cache_from_record(model, method, record, tokenizer, elided=elided)
        compress_s = time.perf_counter() - t0 - (record.seconds if elided else 0.0)
        gen = greedy_generate(model, cache, [] if aware else [qst], max_new_tokens, set() if decode_all else eos,
                              logits=record.logits if aware else None, stop=None if decode_all else stop)
    answer = tokenizer.decode([t for t in gen.tokens if t not in eos], skip_special_tokens=True)
    n_dec = len(gen.tokens) - 1
    return answer, {
        "kv_bytes": gen.kv_bytes, "full_kv_bytes": gen.full_kv_bytes, "peak_kv_bytes": gen.peak_kv_bytes,
        "read_kv_bytes": gen.read_kv_bytes,
        "prompt_tokens": int(ctx.shape[1] + qst.shape[1]),
        "prefill_s": record.seconds + compress_s + gen.prefill_s, "compress_s": compress_s,
        "decode_tokens_per_s": n_dec / gen.decode_s if n_dec and gen.decode_s > 0 else None,
        "hit_limit": len(gen.tokens) >= max_new_tokens and gen.tokens[-1] not in eos,
    }


def run_accuracy(bench: Bench, cells: list[Cell], progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Run every unfinished cell; returns all rows of the output file (finished before and now)."""
    rows = {r["cell"]: r for r in read_rows(bench.output) if "cell" in r}
    done_samples: dict[str, dict[int, dict]] = {}
    for r in read_rows(bench.sidecar):
        done_samples.setdefault(r["cell"], {})[r["sample"]] = r
    eos = eos_ids(bench.model, bench.tokenizer)
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    with open(bench.sidecar, "a", encoding="utf-8") as side:
        for (task_name, length, setting), group in groups.items():
            task, aware = bench.tasks[task_name], setting == "query-aware"
            stop = first_line_stop(bench.tokenizer) if getattr(task, "first_line", False) else None
            todo = [c for c in group if c.key not in rows]
            if not todo:
                continue
            full_cell = next((c for c in group if c.method == "full"), None)
            samples = bench.samples(task_name, length)
            # the full cache first: a task it cannot do is dropped before the methods spend time on it
            for batch in ([c for c in todo if c.method == "full"], [c for c in todo if c.method != "full"]):
                full_row = rows.get(full_cell.key) if full_cell else None
                if batch and batch[0].method != "full" and full_row and full_row.get("dropped"):
                    if progress:
                        progress(len(batch) * len(samples))
                    continue
                for i, sample in enumerate(samples):
                    need = [c for c in batch if i not in done_samples.get(c.key, {})]
                    if not need:
                        if progress:
                            progress(len(batch))
                        continue
                    ctx, qst = build_prompt(bench.tokenizer, sample["context"], sample["question"],
                                            sample.get("answer_prefix", ""))
                    record = record_prefill(bench.model, torch.cat([ctx, qst], dim=1) if aware else ctx)
                    for c in need:
                        answer, m = run_sample(bench.model, bench.tokenizer, make_method(c.method, c.ratio), record,
                                               ctx, qst, aware, task.max_new_tokens, eos, stop=stop)
                        rec = {"cell": c.key, "sample": i, "answer": answer.strip(),
                               "expected": sample.get("answer"), "score": float(task.score(answer, sample)), **m}
                        side.write(json.dumps(rec) + "\n")
                        side.flush()
                        done_samples.setdefault(c.key, {})[i] = rec
                        if progress:
                            progress(1)
                    del record
                for c in batch:
                    recs = [done_samples[c.key][i] for i in range(len(samples))]
                    full = rows.get(full_cell.key) if full_cell and c.method != "full" else None
                    rows[c.key] = {**bench.cell_row(c, recs, full), "cell": c.key}
                write_rows(bench.output, list(rows.values()))
    return list(rows.values())


@torch.no_grad()
def timing_pass(bench: Bench, cells: list[Cell], repeats: int = 3, decode_tokens: int = 32,
                progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Times per (method, ratio, length, setting), alone: one prompt of the first task at that length, the
    prefill recorded once per repeat, `decode_tokens` decoded whatever the answer (EOS ignored); medians of
    `repeats`. Every finished row of that (method, ratio, length, setting) gets the medians."""
    rows = {r["cell"]: r for r in read_rows(bench.output) if "cell" in r}
    eos = eos_ids(bench.model, bench.tokenizer)
    timed: dict[tuple, dict] = {}
    for c in cells:
        k = (c.method, c.ratio, c.length, c.setting)
        if k in timed or c.key not in rows or rows[c.key].get("dropped"):
            if progress:
                progress(1)
            continue
        sample = bench.samples(c.task, c.length)[0]
        ctx, qst = build_prompt(bench.tokenizer, sample["context"], sample["question"], sample.get("answer_prefix", ""))
        aware = c.setting == "query-aware"
        runs = []
        for _ in range(repeats):
            record = record_prefill(bench.model, torch.cat([ctx, qst], dim=1) if aware else ctx)
            runs.append(run_sample(bench.model, bench.tokenizer, make_method(c.method, c.ratio), record, ctx, qst,
                                   aware, decode_tokens, eos, decode_all=True)[1])
        med = lambda f: round(statistics.median(r[f] for r in runs), 4)  # noqa: E731
        timed[k] = {"prefill_s": med("prefill_s"), "compress_s": med("compress_s"),
                    "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in runs), 2),
                    "timing": f"timing pass: alone, median of {repeats}, {decode_tokens} tokens decoded, "
                              f"{c.task} prompt {c.length}"}
        if progress:
            progress(1)
    for r in rows.values():
        t = timed.get((r["method"], r["target_ratio"], r["length"], r["setting"]))
        if t:
            r.update(t)
    write_rows(bench.output, list(rows.values()))
    return list(rows.values())
