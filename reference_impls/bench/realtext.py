"""Tasks over real text that ships with Python, in the manner of LongBench: code completion over the standard
library's own source, few-shot classification of docstring sentences, and QA over documentation entries.
Every maker has the signature make(n, n_tokens, seed, tokenizer) -> list[dict].

Paper: Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding", arXiv
2308.14508 (categories code completion (LCC), few-shot (TREC), single-document QA). Official code:
https://github.com/THUDM/LongBench
Deviations: the texts are standard-library source and docstrings, not GitHub repositories, TREC questions or
papers; LCC's target is the next line after a random cut, here the next line that is code (not blank, comment
or docstring) and whose names all occur in the context, so that it is predictable from it; the few-shot labels
are the module a sentence comes from (3 classes), not TREC's 50 question types; the QA answer is the
description a function's reference line gives (extractive lookup, edit similarity), not free-form answers scored
by F1; `codesig` (a function's signature found in a long file) stands in for code where the embedded model
cannot complete lines. Prompts are written here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import random
import re
import tokenize

from reference_impls.bench.needles import token_counter
from reference_impls.data import module_sentences

__all__ = ["code_samples", "codesig_samples", "docqa_samples", "fewshot_samples", "trec_samples"]

# Pure-Python modules with long sources and ordinary code style.
_CODE_SOURCES = ("argparse", "calendar", "configparser", "csv", "dataclasses", "difflib", "fractions", "ftplib",
                 "gettext", "heapq", "imaplib", "inspect", "optparse", "pprint", "shutil", "smtplib", "statistics",
                 "tarfile", "textwrap", "tokenize")


@functools.lru_cache(maxsize=None)
def _code_lines(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A module's source lines and the indices of lines worth predicting: indented code inside a function,
    at least 15 characters, not a comment, not part of a multi-line string, every name already used above."""
    src = inspect.getsource(importlib.import_module(name))
    lines = tuple(src.splitlines())
    in_string = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            in_string.update(range(tok.start[0] - 1, tok.end[0]))
    seen: set[str] = set()
    targets = []
    for i, line in enumerate(lines):
        names = set(re.findall(r"[A-Za-z_]\w*", line))
        text = line.strip()
        if (i not in in_string and line.startswith("        ") and len(text) >= 15 and not text.startswith("#")
                and text[0] not in "\"')]}" and names <= seen):
            targets.append(i)
        seen |= names
    return lines, tuple(targets)


def code_samples(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """About `n_tokens` of a standard-library module's source ending just before a predictable line (LCC)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    while len(out) < n:
        name = rng.choice(_CODE_SOURCES)
        lines, targets = _code_lines(name)
        t = rng.choice(targets)
        start, used = t, 0
        while start > 0 and used < n_tokens:
            start -= 1
            used += count(lines[start]) + 1  # +1: the newline
        if used < 0.85 * n_tokens:  # too close to the top of the file for this length
            continue
        out.append({"context": "\n".join(lines[start:t]),
                    "question": "Write the next line of the Python code above. Reply with that one line only.",
                    "answer": lines[t].strip(), "module": name, "line": t + 1})
    return out


# Modules whose docstrings talk about clearly different things: the labels of the few-shot task.
_FEWSHOT_MODULES = ("statistics", "tarfile", "threading")  # 20+ sentences each, distinct topics


def fewshot_samples(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """Many "Sentence: ... / Module: ..." examples, then one new sentence to label with its module (TREC-like)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    pools = {m: list(dict.fromkeys(module_sentences(m))) for m in _FEWSHOT_MODULES}
    labels = ", ".join(_FEWSHOT_MODULES)
    for i in range(n):
        label = _FEWSHOT_MODULES[i % len(_FEWSHOT_MODULES)]  # every label asked equally often
        query = rng.choice(pools[label])
        per = {m: rng.sample([s for s in p if s != query], len(p) - (m == label)) for m, p in pools.items()}
        shots = [(per[m][j], m) for j in range(max(map(len, per.values()))) for m in rng.sample(list(per), len(per))
                 if j < len(per[m])]  # labels in turn, so that every label is shown about equally often
        lines, used = [], 0
        for s, m in shots:
            if used >= n_tokens:
                break
            lines.append(f"Sentence: {s}\nModule: {m}")
            used += count(lines[-1]) + 2  # +2: the blank line between examples
        out.append({"context": f"Each sentence below comes from the documentation of one Python module: {labels}.\n\n"
                               + "\n\n".join(lines),
                    "question": f"Sentence: {query}",  # shaped like the examples: a question here made it worse
                    "answer_prefix": "Module:", "answer": label})
    return out


@functools.lru_cache(maxsize=1)
def _doc_entries() -> tuple[tuple[str, str], ...]:
    """(module.function, first sentence of its docstring) for public functions with a distinct description."""
    entries, seen = [], set()
    for m in _CODE_SOURCES + ("json", "random", "os.path", "string", "functools", "itertools", "math", "re"):
        mod = importlib.import_module(m)
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if not doc or getattr(obj, "__module__", m) not in (m, mod.__name__) or inspect.isclass(obj):
                continue
            first = re.split(r"(?<=\.)\s", re.sub(r"\s+", " ", doc.split("\n\n")[0]))[0]
            if 30 <= len(first) <= 160 and first.endswith(".") and first not in seen:
                seen.add(first)
                entries.append((f"{m}.{name}", first))
    return tuple(entries)


def docqa_samples(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """A reference list "module.function: first sentence of its docstring"; the question names one function and
    asks for its line; the reply starts with the name, the model completes the description (single-document QA
    with an extractive answer, scored by edit similarity; the asked entry sweeps the depths). Asking the
    reverse (the function described as "...") scored 0.4 with the full cache at 1.5k tokens: the model names a
    neighbour; this direction scores 0.73 (n = 10)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for i in range(n):
        entries = list(_doc_entries())
        rng.shuffle(entries)
        lines, used = [], 0
        for name, first in entries:
            if used >= n_tokens:
                break
            lines.append(f"{name}: {first}")
            used += count(lines[-1]) + 1
        ask = round(i / max(n - 1, 1) * (len(lines) - 1))
        name, first = entries[ask]
        out.append({"context": "Reference of Python standard-library functions, one per line: the function's name, "
                               "then what it does.\n\n" + "\n".join(lines),
                    "question": f"Repeat the line for {name} from the reference above.",
                    "answer_prefix": f"{name}:", "answer": first, "depth": ask / max(len(lines) - 1, 1)})
    return out


@functools.lru_cache(maxsize=None)
def _def_lines(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A module's source lines and the indices of its one-line `def` statements."""
    lines = tuple(inspect.getsource(importlib.import_module(name)).splitlines())
    return lines, tuple(i for i, l in enumerate(lines) if re.match(r"\s*def [A-Za-z]\w*\(.*\):\s*$", l)
                        and len(l.strip()) > 20)


def codesig_samples(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """About `n_tokens` of a standard-library module's source holding 3+ functions; the question names one
    function and asks for its `def` line, the reply starts with `def name(` and the model completes the
    parameters (code retrieval over a long file, RepoBench-like; edit similarity). The 135M model cannot do
    LCC's next-line completion (`code`: 0.14 with the full cache) but finds a signature in long code (0.64)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    while len(out) < n:
        lines, defs = _def_lines(rng.choice(_CODE_SOURCES))
        start = rng.randrange(0, max(1, len(lines) - 50))
        end, used = start, 0
        while end < len(lines) and used < n_tokens:
            used += count(lines[end]) + 1
            end += 1
        inside = [i for i in defs if start <= i < end]
        names = [re.match(r"\s*def (\w+)\(", lines[i]).group(1) for i in inside]
        if used < 0.85 * n_tokens or len(inside) < 3:
            continue
        t = rng.choice(inside)
        fname = re.match(r"\s*def (\w+)\(", lines[t]).group(1)
        if names.count(fname) > 1:  # two methods of that name in the window: the question would be ambiguous
            continue
        head = f"def {fname}("
        out.append({"context": "\n".join(lines[start:end]),
                    "question": f"Repeat the line of the code above that starts with `{head}`.",
                    "answer_prefix": head, "answer": lines[t].strip()[len(head):], "line": t + 1})
    return out


# TREC's coarse question types (Li and Roth 2002), each with question shapes written here; subjects are
# standard-library module names, so no question needs world knowledge to be asked, only its shape to be typed.
_TREC = {
    "NUM": ("How many functions does the {m} module define?", "How many lines long is the {m} module?",
            "How much memory does the {m} module use?", "How many classes are in the {m} module?"),
    "HUM": ("Who wrote the {m} module?", "Who maintains the {m} module today?", "Who added the {m} module?",
            "Who reviewed the first version of the {m} module?"),
    "LOC": ("Where is the {m} module stored on disk?", "Where does the {m} module live?",
            "Where can I find the source of the {m} module?", "Where is the {m} module installed?"),
    "DESC": ("Why was the {m} module added?", "Why does the {m} module exist?", "Why is the {m} module slow?",
             "Why do people use the {m} module?"),
    "ABBR": ("What does the abbreviation {m} stand for?", "What is the abbreviation {m} short for?",
             "What does the abbreviation {m} expand to?", "What is the abbreviation {m} an acronym of?"),
}


def trec_samples(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """Many "Question: ... / Type: LABEL" examples (TREC's coarse types), then a new question to type (few-shot
    in-context classification, LongBench's TREC; exact match of the label)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    modules = sorted(set(_CODE_SOURCES) | {"json", "random", "string", "functools", "itertools", "math", "re"})
    labels = list(_TREC)
    for i in range(n):
        label = labels[i % len(labels)]
        query = rng.choice(_TREC[label]).format(m=rng.choice(modules))
        lines, used = [], 0
        while used < n_tokens:
            lab = rng.choice(labels)
            q = rng.choice(_TREC[lab]).format(m=rng.choice(modules))
            if q == query:
                continue
            lines.append(f"Question: {q}\nType: {lab}")
            used += count(lines[-1]) + 2
        out.append({"context": f"Each question below is labelled with its type, one of {', '.join(labels)}.\n\n"
                               + "\n\n".join(lines),
                    "question": f"Question: {query}", "answer_prefix": "Type:", "answer": label})
    return out
