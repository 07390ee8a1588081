"""The synthetic suite (reference_impls/architectures/suite.py): every answer is in the sequence and a plain
Python reader recovers it from the ids alone; targets are the ids shifted; exact match scores answers, not
tokens; a seed fixes a batch; bad sizes name the parameter."""

import pytest
import torch

from reference_impls.architectures import suite
from reference_impls.architectures.suite import (ASK, COPY, KEY, NOISE, AssociativeRecall, Passkey, SelectiveCopy,
                                                 exact_match, mixed_batch)

LENGTHS = (48, 129, 512)


# ------------------------------------------------------------------------------------------ plain readers
# Each reads one row of ids (a list of ints) as a person would and returns {position: the token due next},
# for the positions whose next token is the answer. Nothing here calls the suite.
def read_recall(ids, pairs):
    table = dict(zip(ids[0:2 * pairs:2], ids[1:2 * pairs:2]))
    assert len(table) == pairs  # keys distinct
    out = {}
    for t in range(2 * pairs, len(ids) - 1):
        if ids[t] in table:  # a key again: its value comes next
            out[t] = table[ids[t]]
    return out


def read_copy(ids):
    marker = ids.index(COPY)
    data = [x for x in ids[:marker] if x != NOISE]
    return {marker + i: x for i, x in enumerate(data)}


def read_passkey(ids):
    ask = len(ids) - 1 - ids[::-1].index(ASK)
    key = ids.index(KEY)
    n = len(ids) - ask - 1
    return {ask + i: ids[key + 1 + i] for i in range(n)}


READERS = {"recall": lambda ids: read_recall(ids, suite.TASKS["recall"].pairs), "copy": read_copy, "passkey": read_passkey}


@pytest.mark.parametrize("name", ["recall", "copy", "passkey"])
@pytest.mark.parametrize("length", LENGTHS)
def test_answers_are_recoverable_from_the_ids_alone(name, length):
    task = suite.TASKS[name]
    ids, targets, mask = task.batch(16, length, torch.Generator().manual_seed(length))
    assert ids.shape == targets.shape == mask.shape == (16, length)
    assert ids.min() >= 0 and ids.max() < suite.MIN_VOCAB and mask.dtype == torch.bool
    assert (targets[:, :-1] == ids[:, 1:]).all() and not mask[:, -1].any()
    per_row = {"recall": task.queries if name == "recall" else 0, "copy": getattr(task, "tokens", 0),
               "passkey": getattr(task, "digits", 0)}[name]
    assert (mask.sum(1) == per_row).all()
    for row in range(16):
        want = READERS[name](ids[row].tolist())
        scored = {t: targets[row, t].item() for t in mask[row].nonzero().flatten().tolist()}
        assert scored == want


def test_recall_queries_ask_stored_keys_and_copy_keeps_order():
    ids, _, mask = AssociativeRecall(pairs=6, queries=6).batch(8, 64, torch.Generator().manual_seed(1))
    for row in ids.tolist():
        stored = row[0:12:2]
        assert sorted(row[52::2]) == sorted(stored)  # every key asked once, in some order
        assert not set(row[12:52]) & set(range(15, 47))  # the gap is filler only
    ids, _, _ = SelectiveCopy(tokens=5).batch(8, 40, torch.Generator().manual_seed(2))
    for row in ids.tolist():
        before = [x for x in row[:row.index(COPY)] if x != NOISE]
        assert before == row[-5:] and len(before) == 5


def test_passkey_depth_spans_the_haystack():
    ids, _, _ = Passkey(digits=5).batch(200, 256, torch.Generator().manual_seed(3))
    where = (ids == KEY).float().argmax(1)
    assert (ids == KEY).sum(1).eq(1).all()
    assert where.min() < 20 and where.max() > 220  # needles near the start and near the question


def test_a_seed_fixes_the_batch():
    a = mixed_batch(9, 64, torch.Generator().manual_seed(7))
    b = mixed_batch(9, 64, torch.Generator().manual_seed(7))
    c = mixed_batch(9, 64, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert (a[2].sum(1) > 0).all()  # every row has an answer


def test_exact_match_scores_answers():
    targets = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, False]])
    pred = torch.tensor([[0, 6, 7, 0], [5, 6, 0, 8]])  # row 0: both scored right; row 1: one wrong
    logits = torch.nn.functional.one_hot(pred, 10).float()
    assert exact_match(logits, targets, mask, per_position=False).tolist() == [1.0, 0.0]
    assert exact_match(logits, targets, mask, per_position=True).tolist() == [1.0, 1.0, 1.0, 0.0]


class Oracle(torch.nn.Module):
    """Logits from the plain readers: the right answer at every scored position (a model that solves the suite)."""

    def forward(self, ids):
        out = torch.zeros(*ids.shape, suite.MIN_VOCAB)
        for b, row in enumerate(ids.tolist()):
            name = "copy" if COPY in row else "passkey" if ASK in row else "recall"
            for t, tok in READERS[name](row).items():
                out[b, t, tok] = 1.0
        return out


@pytest.mark.parametrize("name", ["recall", "copy", "passkey"])
def test_accuracy_of_a_solver_is_one_and_of_a_constant_is_chance(name):
    task = suite.TASKS[name]
    assert task.accuracy(Oracle(), 96, n=20) == 1.0
    constant = lambda ids: torch.zeros(*ids.shape, suite.MIN_VOCAB)  # always predicts token 0 (PAD)
    assert task.accuracy(constant, 96, n=20) == 0.0


def test_bad_sizes_name_the_parameter():
    gen = torch.Generator()
    with pytest.raises(ValueError, match="pairs=17"):
        AssociativeRecall(pairs=17)
    with pytest.raises(ValueError, match=r"queries=5 must be in \[1, pairs=4\]"):
        AssociativeRecall(pairs=4, queries=5)
    with pytest.raises(ValueError, match="length=23: the recall task needs at least 24"):
        AssociativeRecall(pairs=8, queries=4).batch(2, 23, gen)
    with pytest.raises(ValueError, match="digits=0"):
        Passkey(digits=0)
    with pytest.raises(ValueError, match="tokens=0"):
        SelectiveCopy(tokens=0)
    with pytest.raises(ValueError, match="n=0"):
        Passkey().batch(0, 64, gen)
    with pytest.raises(ValueError, match="n=2 must be >= 3"):
        mixed_batch(2, 64, gen)
