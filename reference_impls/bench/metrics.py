"""Answer metrics of `kvatlas bench`: pure functions of (model output, reference strings) -> score in [0, 1].

    contains  1 if a reference appears in the output (case and whitespace normalized)     RULER string_match
    recall    fraction of the references that appear in the output                        RULER string_match_all
    exact     the output's first non-empty line equals a reference (normalized)
    edit_sim  difflib ratio of the output's first code line and the reference line        LongBench code_sim
    f1        token F1 against the best reference (SQuAD normalization)                   LongBench qa_f1
    rouge_l   LCS-based F-measure over tokens against the best reference                  LongBench rouge

RULER: Hsieh et al., arXiv 2404.06654. LongBench: Bai et al., arXiv 2308.14508.
Deviations: LongBench's edit similarity is fuzzywuzzy's ratio; difflib's SequenceMatcher ratio is the same
idea (2 * matches / total length) without the dependency and can differ by a few points. ROUGE-L here is the
plain sentence-level LCS F1 (beta = 1) over lower-cased word tokens, no stemming. Every metric but `recall`
takes the best of several references (LongBench's "any of the answers").
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

__all__ = ["METRICS", "contains", "edit_sim", "exact", "f1", "first_line", "normalize", "recall", "rouge_l"]


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, ends stripped of spaces and sentence punctuation."""
    return re.sub(r"\s+", " ", text).strip().lower().strip(" .,;:!?\"'")


def first_line(text: str) -> str:
    """The first non-empty line, skipping Markdown code fences (chat models wrap code in ```)."""
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("```"):
            return line.strip()
    return ""


def contains(output: str, refs: list[str]) -> float:
    out = normalize(output)
    return float(any(normalize(r) in out for r in refs if normalize(r)))


def recall(output: str, refs: list[str]) -> float:
    out = normalize(output)
    return sum(normalize(r) in out for r in refs) / len(refs) if refs else 0.0


def exact(output: str, refs: list[str]) -> float:
    out = normalize(first_line(output))
    return float(any(out == normalize(r) for r in refs))


def edit_sim(output: str, refs: list[str]) -> float:
    out = first_line(output)
    return max((difflib.SequenceMatcher(None, out, first_line(r)).ratio() for r in refs), default=0.0)


def _words(text: str) -> list[str]:
    """SQuAD-style tokens: lower case, no punctuation, no articles."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def f1(output: str, refs: list[str]) -> float:
    def one(pred: list[str], gold: list[str]) -> float:
        common = sum((Counter(pred) & Counter(gold)).values())
        if not common:
            return 0.0
        p, r = common / len(pred), common / len(gold)
        return 2 * p * r / (p + r)

    return max((one(_words(output), _words(r)) for r in refs), default=0.0)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence; one row of the DP table at a time (O(len(b)) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(output: str, refs: list[str]) -> float:
    def one(pred: list[str], gold: list[str]) -> float:
        lcs = _lcs(pred, gold)
        if not lcs:
            return 0.0
        p, r = lcs / len(pred), lcs / len(gold)
        return 2 * p * r / (p + r)

    return max((one(output.lower().split(), r.lower().split()) for r in refs), default=0.0)


METRICS = {"contains": contains, "recall": recall, "exact": exact, "edit_sim": edit_sim, "f1": f1,
           "rouge_l": rouge_l}
