"""The synthetic suite every architecture trains and is evaluated on: associative recall, selective copying and a
passkey, generated on the fly from a seed (`torch.Generator`), token-level over a small vocabulary.

Papers: associative recall is MQAR (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927, §3: key-value pairs, then keys queried again, the target the paired value); selective
copying follows Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752,
§4.1.1 (tokens scattered among noise tokens at random positions, to be reproduced in order); the passkey follows
Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300 (a number hidden in filler, asked at the end).
Deviations: MQAR here puts the pairs first, filler in the middle and every query at the end (Zoology spreads the
queries over the sequence), so a longer sequence means a longer distance between a pair and its query; the
filler is random tokens of their own range, not Zoology's zeros or the passkey's repeated sentences; copying
uses a marker token before the answer, as Mamba's task does implicitly (the answer's positions are fixed).

Every task's `batch(n, length, gen)` returns, each (B, T) with T = length:

* `ids` long: the sequence;
* `targets` long: the token the model must predict at each position (ids shifted left; PAD at the end);
* `loss_mask` bool: the positions that are scored, those whose next token belongs to the answer.

`accuracy(model, length, n, seed)` is the exact-match rate of the answers under teacher forcing, from one
parallel forward. An answer is right when every one of its tokens is the argmax; for a multi-token answer that is
the same as greedy decoding, since greedy decoding feeds back exactly the tokens teacher forcing gives while they
are right. Recall's answers are its queries (one value token each); copying's and the passkey's are whole rows.

Token layout (every task shares one vocabulary of at least 64 ids):

| ids | role |
|---|---|
| 0 | PAD (after the last token) |
| 1, 2, 3, 4 | NOISE (copying's blank), COPY (copy now), KEY (the passkey follows), ASK (say the passkey) |
| 5-14 | digits (passkey) |
| 15-30 / 31-46 | recall's keys / values; 15-46 together: copying's tokens |
| 47-63 | filler (recall's gap, the passkey's haystack) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AssociativeRecall", "Passkey", "SelectiveCopy", "TASKS", "exact_match", "mixed_batch",
           "PAD", "NOISE", "COPY", "KEY", "ASK", "DIGITS", "KEYS", "VALUES", "DATA", "FILLER", "MIN_VOCAB"]

PAD, NOISE, COPY, KEY, ASK = 0, 1, 2, 3, 4
DIGITS, KEYS, VALUES, FILLER = range(5, 15), range(15, 31), range(31, 47), range(47, 64)
DATA = range(15, 47)
MIN_VOCAB = 64


def _uniform(gen: torch.Generator, r: range, shape) -> Tensor:
    return torch.randint(r.start, r.stop, shape, generator=gen)


def _pack(ids: Tensor, answer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ids (B, T), answer (B, T) bool marking the answer's tokens -> (ids, targets, loss_mask): position t is
    scored when token t + 1 is part of the answer."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], PAD)], 1)
    mask = torch.cat([answer[:, 1:], torch.zeros_like(answer[:, :1])], 1)
    return ids, targets, mask


def exact_match(logits: Tensor, targets: Tensor, loss_mask: Tensor, per_position: bool) -> Tensor:
    """(B, T, V), (B, T), (B, T) -> one 0/1 float per answer: every scored position of the answer predicted.
    per_position: each scored position is its own answer (recall's queries); else each row is one answer."""
    right = logits.argmax(-1) == targets
    if per_position:
        return right[loss_mask].float()
    return (right | ~loss_mask).all(-1).float()


class _Task:
    name: str
    per_position: bool
    min_length: int

    def _check(self, n: int, length: int) -> None:
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if length < self.min_length:
            raise ValueError(f"length={length}: the {self.name} task needs at least {self.min_length} tokens")

    def batch(self, n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def accuracy(self, model, length: int, n: int = 96, seed: int = 1234, chunk: int = 32) -> float:
        """Exact-match accuracy of `model` (ids (B, T) -> logits (B, T, V)) on n fresh sequences of `length`."""
        gen = torch.Generator().manual_seed(seed)
        ids, targets, mask = self.batch(n, length, gen)
        scores = [exact_match(model(ids[i:i + chunk]), targets[i:i + chunk], mask[i:i + chunk], self.per_position)
                  for i in range(0, n, chunk)]
        return torch.cat(scores).mean().item()


@dataclass
class AssociativeRecall(_Task):
    """MQAR: `pairs` key-value pairs, filler, then `queries` of their keys, each followed by its value.

    `[k1 v1 ... kP vP] [filler ...] [q1 a1 ... qQ aQ]`: keys distinct within a row, values drawn with replacement.
    """

    pairs: int = 4
    queries: int = 4
    name = "recall"
    per_position = True

    def __post_init__(self):
        if not 1 <= self.pairs <= len(KEYS):
            raise ValueError(f"pairs={self.pairs} must be in [1, {len(KEYS)}] (distinct keys)")
        if not 1 <= self.queries <= self.pairs:
            raise ValueError(f"queries={self.queries} must be in [1, pairs={self.pairs}]")
        self.min_length = 2 * (self.pairs + self.queries)

    def batch(self, n, length, gen):
        self._check(n, length)
        P, Q = self.pairs, self.queries
        keys = torch.rand(n, len(KEYS), generator=gen).argsort(-1)[:, :P] + KEYS.start  # distinct per row
        values = _uniform(gen, VALUES, (n, P))
        asked = torch.rand(n, P, generator=gen).argsort(-1)[:, :Q]  # which pairs are queried, in which order
        ids = _uniform(gen, FILLER, (n, length))
        ids[:, 0:2 * P:2], ids[:, 1:2 * P:2] = keys, values
        start = length - 2 * Q
        ids[:, start::2], ids[:, start + 1::2] = keys.gather(1, asked), values.gather(1, asked)
        answer = torch.zeros(n, length, dtype=torch.bool)
        answer[:, start + 1::2] = True
        return _pack(ids, answer)


@dataclass
class SelectiveCopy(_Task):
    """`tokens` data tokens at random positions among NOISE, then COPY, then the same tokens in order."""

    tokens: int = 4
    name = "copy"
    per_position = False

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1")
        self.min_length = 2 * self.tokens + 1

    def batch(self, n, length, gen):
        self._check(n, length)
        N, span = self.tokens, length - self.tokens - 1  # the data tokens sit in ids[:, :span]
        data = _uniform(gen, DATA, (n, N))
        where = torch.rand(n, span, generator=gen).argsort(-1)[:, :N].sort(-1).values  # increasing positions
        ids = torch.full((n, length), NOISE)
        ids.scatter_(1, where, data)
        ids[:, span], ids[:, span + 1:] = COPY, data
        answer = torch.zeros(n, length, dtype=torch.bool)
        answer[:, span + 1:] = True
        return _pack(ids, answer)


@dataclass
class Passkey(_Task):
    """Filler with [KEY d1 .. dD] at a uniform random depth; the row ends with [ASK d1 .. dD]."""

    digits: int = 3
    name = "passkey"
    per_position = False

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"digits={self.digits} must be >= 1")
        self.min_length = 2 * (self.digits + 1)

    def batch(self, n, length, gen):
        self._check(n, length)
        D = self.digits
        key = _uniform(gen, DIGITS, (n, D))
        hay = length - 2 * (D + 1)  # filler tokens
        depth = torch.randint(0, hay + 1, (n,), generator=gen)  # the needle starts after `depth` filler tokens
        ids = _uniform(gen, FILLER, (n, length))
        for i in range(n):  # rows differ in where the needle sits
            d = int(depth[i])
            ids[i, d], ids[i, d + 1:d + 1 + D] = KEY, key[i]
        ids[:, -(D + 1)], ids[:, -D:] = ASK, key
        answer = torch.zeros(n, length, dtype=torch.bool)
        answer[:, -D:] = True
        return _pack(ids, answer)


#: the suite: one instance of each task with the defaults every run uses
TASKS = {t.name: t for t in (AssociativeRecall(), SelectiveCopy(), Passkey())}


def mixed_batch(n: int, length: int, gen: torch.Generator, tasks=None) -> tuple[Tensor, Tensor, Tensor]:
    """n rows of `length`, the tasks taking turns (row i from task i mod 3), shuffled together."""
    tasks = list((tasks or TASKS).values())
    if n < len(tasks):
        raise ValueError(f"n={n} must be >= {len(tasks)} (one row per task at least)")
    parts = [t.batch(len(range(i, n, len(tasks))), length, gen) for i, t in enumerate(tasks)]
    order = torch.randperm(n, generator=gen)
    return tuple(torch.cat(x)[order] for x in zip(*parts))
