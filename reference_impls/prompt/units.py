"""Shared mechanics of prompt compression: a prompt's lexical units and a token budget filled by score.

Selective Context, LLMLingua and LongLLMLingua drop units of the user's text (tokens, sentences, documents)
before the model sees it; the cache then holds the shorter prompt. The units here are built from token ids:
a sentence ends after a token whose text ends a sentence (., !, ?) or holds a newline; a document is a run of
whole sentences of about `doc_tokens` tokens. Without a tokenizer (random-weight test models) sentences are
fixed runs of 16 tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["documents", "fill_budget", "sentences"]


def sentences(ids: Tensor, tokenizer=None) -> Tensor:
    """(1, n) ids -> (n,) int64: the index of the sentence each token belongs to (0, 1, ... in order)."""
    n = ids.shape[1]
    if tokenizer is None:
        return torch.arange(n) // 16
    texts = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    ends = [t is not None and ("\n" in (s := tokenizer.convert_tokens_to_string([t])) or s.rstrip().endswith((".", "!", "?")))
            for t in texts]
    starts = torch.tensor([False] + ends[:-1])  # a token after an end starts a sentence
    return starts.long().cumsum(0)


def documents(ids: Tensor, tokenizer=None, doc_tokens: int = 128) -> Tensor:
    """(1, n) ids -> (n,) int64 document index: whole sentences grouped greedily into ~`doc_tokens`-token runs."""
    sent = sentences(ids, tokenizer)
    sizes = torch.bincount(sent).tolist()
    doc, fill, out = 0, 0, []
    for size in sizes:
        if fill and fill + size > doc_tokens:
            doc, fill = doc + 1, 0
        out.append(doc)
        fill += size
    return torch.tensor(out, dtype=torch.long)[sent]


def fill_budget(unit_scores: Tensor, unit_sizes: Tensor, budget: int) -> Tensor:
    """(U,) bool: the units kept, best score first, skipping any that would overflow `budget` tokens (at least one
    unit is kept). Ties go to the earlier unit."""
    order = torch.argsort(-unit_scores.double(), stable=True)
    keep = torch.zeros_like(unit_sizes, dtype=torch.bool)
    total = 0
    for u in order.tolist():
        size = int(unit_sizes[u])
        if total + size <= budget or total == 0:
            keep[u], total = True, total + size
    return keep
