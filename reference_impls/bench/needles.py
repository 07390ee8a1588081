"""Needle tasks in the manner of RULER: several needles, one key with several values, variable tracking,
frequent-word extraction. Every maker has the signature make(n, n_tokens, seed, tokenizer) -> list[dict].

Paper: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", arXiv
2404.06654 (tasks niah_multikey, niah_multivalue, vt, cwe). Official code: https://github.com/NVIDIA/RULER
Deviations: the haystack is standard-library docstring prose (`data.haystack_sentences`), not Paul Graham
essays; keys are two-word labels ("amber lighthouse") rather than single words and values 5 digits, not 7, so
that a 135M model can do the full-cache task; cwe asks for the 3 most frequent words, not 10; vt has 3 hops,
not 4. Prompts are written here, not RULER's templates.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Callable, Optional

from reference_impls.data import haystack_sentences, passkey_samples

__all__ = ["cwe_samples", "fill", "multikey_samples", "multivalue_samples", "passkey", "token_counter",
           "vartrack_samples"]

_ADJ = ("amber", "silver", "crimson", "quiet", "northern", "hollow", "copper", "velvet", "frozen", "golden",
        "rusty", "marble", "distant", "bright", "wooden", "sunken")
_NOUN = ("lighthouse", "orchard", "harbor", "library", "observatory", "bridge", "granary", "chapel", "tunnel",
         "garden", "workshop", "quarry", "station", "tower", "vineyard", "cellar")


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a string: the tokenizer's count when given, else about 4.2 characters per token
    (the estimate data.passkey_samples uses, so the fast tests need no tokenizer)."""
    if tokenizer is None:
        return lambda s: round(len(s) / 4.2)
    return lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)


def fill(rng: random.Random, budget: int, count: Callable[[str], int], pool: Optional[list[str]] = None) -> list[str]:
    """Shuffled haystack sentences until `budget` tokens are used (the passkey generator's loop)."""
    pool = list(pool if pool is not None else haystack_sentences())
    rng.shuffle(pool)
    out, used = [], 0
    for s in pool:
        if used >= budget:
            break
        out.append(s)
        used += count(s) + 1  # +1: the joining space
    return out


def _place(hay: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert needles at relative depths (0 = start, 1 = end), in order, without moving earlier ones."""
    out = list(hay)
    for k, (needle, d) in enumerate(sorted(zip(needles, depths), key=lambda p: p[1])):
        out.insert(round(d * len(hay)) + k, needle)
    return out


def _labels(rng: random.Random, k: int) -> list[str]:
    return [f"{a} {b}" for a, b in rng.sample([(a, b) for a in _ADJ for b in _NOUN], k)]


def _depth(i: int, n: int) -> float:
    return i / max(n - 1, 1)


def passkey(n: int, n_tokens: int, seed: int, tokenizer=None) -> list[dict]:
    """One 5-digit passkey at evenly spread depths (data.passkey_samples, unchanged)."""
    return passkey_samples(n, n_tokens, seed=seed, tokenizer=tokenizer)


def multikey_samples(n: int, n_tokens: int, seed: int, tokenizer=None, keys: int = 4) -> list[dict]:
    """`keys` needles "The access code for the <label> is <5 digits>."; the question asks for one of them."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for i in range(n):
        labels, codes = _labels(rng, keys), [str(rng.randint(10000, 99999)) for _ in range(keys)]
        needles = [f"The access code for the {lab} is {c}." for lab, c in zip(labels, codes)]
        hay = fill(rng, n_tokens - sum(map(count, needles)), count)
        depths = [rng.random() for _ in range(keys)]
        ask = rng.randrange(keys)
        depths[ask] = _depth(i, n)  # the asked needle sweeps the depths, the distractors fall anywhere
        out.append({"context": " ".join(_place(hay, needles, depths)),
                    "question": f"What is the access code for the {labels[ask]}? Answer with the number only.",
                    "answer_prefix": f"The access code for the {labels[ask]} is", "answer": codes[ask],
                    "depth": depths[ask], "label": labels[ask]})
    return out


def multivalue_samples(n: int, n_tokens: int, seed: int, tokenizer=None, values: int = 4) -> list[dict]:
    """One label with `values` codes scattered through the haystack; all of them must be listed (recall)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for _ in range(n):
        label = _labels(rng, 1)[0]
        codes = [str(rng.randint(10000, 99999)) for _ in range(values)]
        needles = [f"One of the access codes for the {label} is {c}." for c in codes]
        hay = fill(rng, n_tokens - sum(map(count, needles)), count)
        depths = sorted(rng.random() for _ in range(values))
        out.append({"context": " ".join(_place(hay, needles, depths)),
                    "question": f"The text above gives {values} access codes for the {label}. List all of them.",
                    "answer_prefix": f"The {values} access codes for the {label} are", "answer": ", ".join(codes),
                    "answers": codes, "depths": depths, "label": label})
    return out


def multiquery_samples(n: int, n_tokens: int, seed: int, tokenizer=None, keys: int = 4) -> list[dict]:
    """RULER's niah_multiquery: `keys` needles as in `multikey_samples`; the question asks for two of them
    (recall: both codes must appear)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for i in range(n):
        labels, codes = _labels(rng, keys), [str(rng.randint(10000, 99999)) for _ in range(keys)]
        needles = [f"The access code for the {lab} is {c}." for lab, c in zip(labels, codes)]
        hay = fill(rng, n_tokens - sum(map(count, needles)), count)
        depths = [rng.random() for _ in range(keys)]
        a, b = sorted(rng.sample(range(keys), 2))
        depths[a] = _depth(i, n)
        out.append({"context": " ".join(_place(hay, needles, depths)),
                    "question": f"What are the access codes for the {labels[a]} and for the {labels[b]}? "
                                "Answer with the two numbers only.",
                    "answer_prefix": f"The access code for the {labels[a]} is", "answer": f"{codes[a]}, {codes[b]}",
                    "answers": [codes[a], codes[b]], "depth": depths[a]})
    return out


def _var_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def vartrack_samples(n: int, n_tokens: int, seed: int, tokenizer=None, hops: int = 3, chains: int = 1) -> list[dict]:
    """A chain "VAR A = 12345.", "VAR B = VAR A.", ... (`hops` links), plus `chains` - 1 distractor chains of
    other values; the question asks which variables hold the first chain's value (multi-hop tracing, RULER vt)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for _ in range(n):
        taken: set[str] = set()
        found, stmts, depths = [], [], []
        for _c in range(chains):
            names, value = [_var_name(rng, taken) for _ in range(hops + 1)], str(rng.randint(10000, 99999))
            found.append((names, value))
            stmts += [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            depths += sorted(rng.uniform(0.05, 0.95) for _ in names)  # each chain in reading order
        hay = fill(rng, n_tokens - sum(map(count, stmts)), count)
        names, value = found[0]
        out.append({"context": " ".join(_place(hay, stmts, depths)),
                    "question": f"Which variables are assigned the value {value}, directly or through other "
                                f"variables? List their names.",
                    "answer_prefix": f"Following the assignments in the text, the variables that equal {value} are",
                    "answer": ", ".join(names), "answers": names})
    return out


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Distinct lower-case words (5-10 letters) of the haystack prose, sorted for determinism."""
    words = {w for s in haystack_sentences() for w in re.findall(r"\b[a-z]{5,10}\b", s)}
    return tuple(sorted(words))


def cwe_samples(n: int, n_tokens: int, seed: int, tokenizer=None, common: int = 3, repeat: int = 20,
                rare_max: int = 3) -> list[dict]:
    """A numbered word list where `common` words occur `repeat` times each and the others 1..`rare_max`
    times; the question asks for the `common` most frequent words (aggregation, RULER cwe)."""
    rng, count, out = random.Random(seed), token_counter(tokenizer), []
    for _ in range(n):
        vocab = rng.sample(_vocabulary(), len(_vocabulary()))
        top, rest = vocab[:common], iter(vocab[common:])
        words = [w for w in top for _ in range(repeat)]
        per_entry = count("123. example\n")
        while (len(words) + rare_max) * per_entry < n_tokens:
            words += [next(rest)] * rng.randint(1, rare_max)
        rng.shuffle(words)
        out.append({"context": "\n".join(f"{j}. {w}" for j, w in enumerate(words, 1)),
                    "question": f"Which {common} words appear most often in the numbered list above? "
                                f"Answer with the {common} words only.",
                    "answer_prefix": f"The {common} most frequent words are", "answer": ", ".join(top),
                    "answers": list(top)})
    return out
