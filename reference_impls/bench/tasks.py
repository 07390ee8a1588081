"""The task suite of `kvatlas bench`: one task per category of the benchmark seed (arXiv 2407.01527: LongBench's
categories plus the needle test) that the embedded 135M model can do with a full cache, generated here from
text that ships with Python; and readers for users' own JSONL and for LongBench's and RULER's data files.

A task makes samples, dicts with `context`, `question`, `answer` (the reference) and optionally `answers` (all
references; every one is required under "recall"), `answer_prefix` (starts the assistant's reply) and metadata
such as `depth`. The prompt is `generation.build_prompt(tokenizer, context, question, answer_prefix)`.

`max_new_tokens` leaves room for the model restating the question before the answer ("The access code for
the amber lighthouse is ..."), which compressed caches often make it do.

Task designs: RULER (Hsieh et al., arXiv 2404.06654) for passkey, multikey, multivalue, vartrack, cwe (see
needles.py); LongBench (Bai et al., arXiv 2308.14508) for code, fewshot, docqa (see realtext.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from reference_impls.bench import needles, realtext
from reference_impls.bench.metrics import METRICS

__all__ = ["PREFIXES", "TASKS", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    name: str
    category: str  # the benchmark seed's category it stands for
    metric: str  # a key of metrics.METRICS
    max_new_tokens: int
    lengths: tuple[int, ...]  # default prompt lengths (tokens) of the benchmark grid
    make: Callable  # make(n, n_tokens, seed, tokenizer) -> list[dict]

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: metric {self.metric!r} is not one of {', '.join(METRICS)}")

    def samples(self, n: int, n_tokens: int, seed: int = 0, tokenizer=None) -> list[dict]:
        """`n` samples of about `n_tokens` tokens (measured with `tokenizer` when given)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"task {self.name}: n must be an integer >= 1, got {n!r}")
        if not isinstance(n_tokens, int) or n_tokens < 100:
            raise ValueError(f"task {self.name}: n_tokens must be an integer >= 100, got {n_tokens!r}")
        return self.make(n, n_tokens, seed, tokenizer)

    @property
    def first_line(self) -> bool:
        """Only the output's first line is scored: decoding may stop at the first newline after some text."""
        return self.metric in ("exact", "edit_sim")

    def score(self, output: str, sample: dict) -> float:
        """The task's metric of the model's output against the sample's references, in [0, 1]."""
        refs = sample.get("answers") or [sample["answer"]]
        return METRICS[self.metric](output, list(refs))


_ONE = (1500,)
# Full cache on the embedded model, bf16, 1.5k tokens, n = 10, query-aware (scripts/task_baselines.py): passkey 1.0
# (n = 5), docqa 0.73, multikey 0.70, codesig 0.64, fewshot 0.60, multivalue 0.33, vartrack 0.15, code 0.14, cwe
# 0.10. The last four are below the 0.6 the benchmark asks of a task: the 135M model cannot do them even
# uncompressed (`kvatlas bench` runs their full cache and records them as dropped).
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("passkey", "synthetic retrieval", "contains", 16, (1000, 2000, 4000, 6000), needles.passkey),
    Task("multikey", "synthetic retrieval", "contains", 24, _ONE, needles.multikey_samples),
    Task("multiquery", "synthetic retrieval", "recall", 32, _ONE, needles.multiquery_samples),
    Task("multivalue", "synthetic retrieval", "recall", 48, _ONE, needles.multivalue_samples),
    Task("vartrack", "multi-hop", "recall", 64, _ONE, needles.vartrack_samples),
    Task("cwe", "aggregation", "recall", 24, _ONE, needles.cwe_samples),
    Task("code", "code", "edit_sim", 48, _ONE, realtext.code_samples),
    Task("codesig", "code", "edit_sim", 40, _ONE, realtext.codesig_samples),
    Task("fewshot", "few-shot", "exact", 8, _ONE, realtext.fewshot_samples),
    Task("trec", "few-shot", "exact", 8, _ONE, realtext.trec_samples),
    Task("docqa", "single-doc QA", "edit_sim", 48, _ONE, realtext.docqa_samples),
)}

# Prefixes of a task spec that name a data file instead of a built-in task.
PREFIXES = ("jsonl:", "longbench:", "ruler:")


def get_task(spec: str) -> Task:
    """A built-in task by name, or a data file read as a task: "jsonl:PATH", "longbench:PATH", "ruler:PATH"."""
    from reference_impls.bench import readers  # readers import Task from here

    for prefix, read in zip(PREFIXES, (readers.read_jsonl, readers.read_longbench, readers.read_ruler)):
        if spec.startswith(prefix):
            return read(spec[len(prefix):])
    if spec not in TASKS:
        raise ValueError(f"unknown task {spec!r}: use one of {', '.join(TASKS)}, or a file as "
                         f"{', '.join(p + 'PATH' for p in PREFIXES)}")
    return TASKS[spec]
