"""Synthetic long-context tasks, generated here (nothing is downloaded): passkey retrieval, RULER-style.

The haystack is natural English prose from the docstrings of Python's own standard library, which ships
with every interpreter, shuffled by sentence with a seeded RNG; one sentence states a 5-digit passkey at a
chosen depth. The question asks for it; an answer is correct when it contains the digits.
"""

from __future__ import annotations

import functools
import importlib
import random
import re
import warnings
from typing import Optional

__all__ = ["haystack_sentences", "module_sentences", "passkey_samples", "is_correct"]

# Modules with long prose docstrings; their text is stable within a Python minor version.
_SOURCES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
            "email", "enum", "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib", "pickle",
            "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
            "typing", "unittest", "urllib.parse", "uuid", "zipfile")

QUESTION = "What is the secret passkey mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret passkey is"  # starts the assistant's reply, as kvpress and RULER do


@functools.lru_cache(maxsize=None)
def module_sentences(name: str) -> tuple[str, ...]:
    """Plain-prose sentences (no code, no digits) from one module's docstrings and its own classes' and functions'."""
    mod = importlib.import_module(name)
    docs = [mod.__doc__ or ""]
    with warnings.catch_warnings():  # typing's deprecated aliases warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        docs += [getattr(obj, "__doc__", None) or "" for obj in vars(mod).values()
                 if getattr(obj, "__module__", None) == mod.__name__]
    out: list[str] = []
    for doc in (d for d in docs if isinstance(d, str)):
        text = re.sub(r"\s+", " ", doc)
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            if 40 <= len(s) <= 300 and s[0].isupper() and s.endswith(".") and not re.search(
                    r"[\d>{}\[\]=_`|\\]|::|\(\)|\.\.\.", s):
                out.append(s)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """Plain-prose sentences (no code, no digits) from standard-library docstrings."""
    return tuple(dict.fromkeys(s for name in _SOURCES for s in module_sentences(name)))  # de-duplicated, order kept


def passkey_samples(n: int = 20, n_tokens: int = 1000, seed: int = 0, tokenizer=None,
                    depths: Optional[list[float]] = None) -> list[dict]:
    """`n` passkey prompts of about `n_tokens` tokens with the needle at evenly spread depths.

    Returns dicts with context, question, answer_prefix, answer, depth (0 = start, 1 = end). Lengths are measured with
    `tokenizer` when given (else about 4.2 characters per token).
    """
    if n < 1 or n_tokens < 50:
        raise ValueError(f"passkey_samples: need n >= 1 and n_tokens >= 50, got n={n}, n_tokens={n_tokens}")
    rng = random.Random(seed)
    pool = list(haystack_sentences())
    depths = depths if depths is not None else [i / max(n - 1, 1) for i in range(n)]
    count = (lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)) if tokenizer else (
        lambda s: round(len(s) / 4.2))
    samples = []
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        needle = f"The secret passkey is {key}. Remember it, {key} is the passkey."
        rng.shuffle(pool)
        hay, used = [], count(needle)
        for s in pool:
            if used >= n_tokens:
                break
            hay.append(s)
            used += count(s) + 1
        depth = depths[i % len(depths)]
        hay.insert(round(depth * len(hay)), needle)
        samples.append({"context": " ".join(hay), "question": QUESTION, "answer_prefix": ANSWER_PREFIX,
                        "answer": key, "depth": depth})
    return samples


def is_correct(answer: str, expected: str) -> bool:
    return expected in answer
