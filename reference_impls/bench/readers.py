"""Data files read as bench tasks: users' own JSONL (the lines `kvatlas generate` reads), LongBench's JSONL and
RULER's prepared JSONL. Each reader checks every line and returns a Task whose `make` ignores n_tokens (the
data sets its own lengths) and returns the first n samples.

LongBench: Bai et al., arXiv 2308.14508, https://github.com/THUDM/LongBench (fields input, context, answers,
length, dataset, language, all_classes, _id). RULER: Hsieh et al., arXiv 2404.06654,
https://github.com/NVIDIA/RULER (fields index, input, outputs, length, answer_prefix).
Deviations: the prompts are worded here, context first and then the question, in the chat template (LongBench
feeds its few-shot and code sets without one); TREC-style classification scores 1 when the output contains
the class (LongBench divides by the number of classes named); edit similarity and ROUGE-L as in metrics.py;
only LongBench's English and code data sets are mapped (Chinese ones need character-level metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

from reference_impls.bench.tasks import Task

__all__ = ["LONGBENCH", "read_jsonl", "read_longbench", "read_ruler"]

_QA = "Answer the question from the text above, as briefly as you can.\n\nQuestion: {input}"
_SUM = "Write a one-paragraph summary of the text above."
# LongBench data set -> (the seed's category, metric, max_new_tokens (LongBench's own limits), question)
LONGBENCH = {
    "narrativeqa": ("single-doc QA", "f1", 128, _QA),
    "qasper": ("single-doc QA", "f1", 128, _QA),
    "multifieldqa_en": ("single-doc QA", "f1", 64, _QA),
    "hotpotqa": ("multi-doc QA", "f1", 32, _QA),
    "2wikimqa": ("multi-doc QA", "f1", 32, _QA),
    "musique": ("multi-doc QA", "f1", 32, _QA),
    "gov_report": ("summarization", "rouge_l", 512, _SUM),
    "qmsum": ("summarization", "rouge_l", 512, "Answer this request about the meeting above in a paragraph: {input}"),
    "multi_news": ("summarization", "rouge_l", 512, _SUM),
    "trec": ("few-shot", "contains", 64, "Give the type of this question, as in the examples above.\n{input}"),
    "triviaqa": ("few-shot", "f1", 32, "Answer as in the examples above.\n{input}"),
    "samsum": ("few-shot", "rouge_l", 128, "Summarize this dialogue as in the examples above.\n{input}"),
    "passage_count": ("synthetic", "exact", 32,
                      "How many different paragraphs are there in the text above? Reply with the number only."),
    "passage_retrieval_en": ("synthetic", "exact", 32, "Which paragraph above does this summary describe? "
                             "Reply in the form \"Paragraph N\".\n\n{input}"),
    "lcc": ("code", "edit_sim", 64, "Write the next line of the code above. Reply with that one line only."),
    "repobench-p": ("code", "edit_sim", 64, "{input}\nWrite the next line of this code. Reply with that line only."),
}


def json_lines(path: str, what: str = "samples"):
    """(line number, JSON object) of each non-empty line; errors name the file and the line (`kvatlas generate`'s
    input is read by this too)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            rows.append((n, row))
    if not rows:
        raise ValueError(f"{path}: no {what}")
    return rows


def _need(path: str, n: int, row: dict, field: str, kind: type):
    value = row.get(field)
    if kind is list:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}:{n}: {field}: must be a non-empty list of strings")
    elif not isinstance(value, kind):
        raise ValueError(f"{path}:{n}: {field}: required {kind.__name__} field is missing or not a {kind.__name__}")
    return value


def _task(name: str, category: str, metric: str, max_new_tokens: int, samples: list[dict]) -> Task:
    return Task(name, category, metric, max_new_tokens, (0,), lambda n, n_tokens, seed, tokenizer: samples[:n])


def read_jsonl(path: str) -> Task:
    """Lines with context, question, answer and optionally answer_prefix; scored by `contains`."""
    samples = []
    for n, row in json_lines(path):
        for field in ("context", "question", "answer"):
            _need(path, n, row, field, str)
        if not isinstance(row.get("answer_prefix", ""), str):
            raise ValueError(f"{path}:{n}: answer_prefix: must be a string")
        samples.append(dict(row))
    return _task(f"jsonl:{Path(path).stem}", "user data", "contains", 32, samples)


def read_longbench(path: str) -> Task:
    """One LongBench data set (LongBench-E's `_e` files too); the metric follows the data set."""
    rows, samples, dataset = json_lines(path), [], None
    for n, row in rows:
        name = _need(path, n, row, "dataset", str)
        name = name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH else name  # LongBench-E's names
        if name not in LONGBENCH:
            raise ValueError(f"{path}:{n}: dataset: {name!r} is not one of {', '.join(LONGBENCH)}")
        if dataset is not None and name != dataset:
            raise ValueError(f"{path}:{n}: dataset: {name!r} differs from line {rows[0][0]}'s {dataset!r}; "
                             f"one data set per file")
        dataset = name
        context, query = _need(path, n, row, "context", str), _need(path, n, row, "input", str)
        answers = _need(path, n, row, "answers", list)
        samples.append({"context": context, "question": LONGBENCH[name][3].format(input=query), "answer": answers[0],
                        "answers": answers, "id": row.get("_id"), "length": row.get("length")})
    category, metric, max_new_tokens, _ = LONGBENCH[dataset]
    return _task(f"longbench:{dataset}", category, metric, max_new_tokens, samples)


def _split_question(text: str) -> tuple[str, str]:
    """RULER's inputs end with the question on its own line ("Question: ..." or a line ending in "?");
    split it off, else everything is context."""
    head, sep, last = text.rstrip().rpartition("\n")
    if sep and head.strip() and (last.strip().startswith("Question:") or last.strip().endswith("?")):
        return head.rstrip(), last.strip()
    return text, ""


def read_ruler(path: str) -> Task:
    """RULER's prepared lines; every one of `outputs` must appear in the answer (string_match_all)."""
    samples = []
    for n, row in json_lines(path):
        context, question = _split_question(_need(path, n, row, "input", str))
        outputs = _need(path, n, row, "outputs", list)
        if not isinstance(row.get("answer_prefix", ""), str):
            raise ValueError(f"{path}:{n}: answer_prefix: must be a string")
        samples.append({"context": context, "question": question, "answer": outputs[0], "answers": outputs,
                        "answer_prefix": row.get("answer_prefix", "").strip(), "index": row.get("index"),
                        "length": row.get("length")})
    return _task(f"ruler:{Path(path).stem}", "synthetic retrieval", "recall", 64, samples)
