"""Calibration prefills: one uncompressed prefill of text that ships with Python, recorded per layer.

Methods that calibrate (Palu's whitening, Eigen-Attention's and Loki's key PCA, KVSharer's layer search,
RazorAttention's and DuoAttention's head patterns) read it through `Model.calibration(text, tokens)` and get one
dense `Step` per layer: the prefill's queries, keys (after RoPE), values, positions and, on demand, attention
weights. Nothing is downloaded; the texts are:

    "stdlib"   standard-library docstrings (the haystack prose of `reference_impls.data`), in a fixed order
    "passkey"  one passkey prompt of that prose with its question (RazorAttention / DuoAttention retrieval)
    "repeat"   a random token sequence, then the same sequence again (induction and echo heads)
    "random"   random tokens (models without a tokenizer, e.g. the tests' tiny model)

Without a tokenizer "stdlib" and "passkey" fall back to "random" (tests on random-weight models calibrate on
random tokens; the embedded model always has its tokenizer).

A record is memoised per model object and, for a model loaded from a path or hub id, cached on disk under
`$KVATLAS_CACHE/calibration/` (default `~/.cache/kvatlas`), keyed by model, dtype, text and length, so a
method's calibration costs one prefill per machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Step

__all__ = ["TEXTS", "calibration_ids", "calibration_steps"]

TEXTS = ("stdlib", "passkey", "repeat", "random")
_memo: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(text, tokens): record}


def calibration_ids(text: str, tokens: int, tokenizer=None, vocab_size: Optional[int] = None, seed: int = 0) -> Tensor:
    """(1, tokens) ids of calibration text `text` (see the module docstring)."""
    if text not in TEXTS:
        raise ValueError(f"calibration text must be one of {', '.join(TEXTS)}, got {text!r}")
    if not (isinstance(tokens, int) and tokens >= 8):
        raise ValueError(f"calibration tokens must be an int >= 8, got {tokens!r}")
    if text in ("repeat", "random"):
        if vocab_size is None:
            raise ValueError(f"calibration text {text!r} needs the vocabulary size")
        g = torch.Generator().manual_seed(seed)
        if text == "random":
            return torch.randint(3, vocab_size, (1, tokens), generator=g)
        half = torch.randint(3, vocab_size, (1, tokens // 2), generator=g)
        return torch.cat([half, half, half[:, : tokens % 2]], dim=1)
    if tokenizer is None:  # documented fallback: random-weight test models have no tokenizer
        return calibration_ids("random", tokens, None, vocab_size, seed)
    from reference_impls.data import QUESTION, haystack_sentences, passkey_samples

    if text == "stdlib":
        body = " ".join(haystack_sentences())
    else:
        # the needle mid-prompt: at depth 0 it would sit beside the sink tokens, and heads that attend to sinks
        # would pass for retrieval heads
        s = passkey_samples(1, tokens, seed=seed, tokenizer=tokenizer, depths=[0.5])[0]
        body = s["context"] + "\n\n" + QUESTION + " " + s["answer_prefix"]
    ids = tokenizer(body, add_special_tokens=False, return_tensors="pt").input_ids
    # prose: its first tokens; a passkey prompt: its last (the question must stay)
    return ids[:, :tokens] if text == "stdlib" else ids[:, -tokens:]


def _disk_path(model, text: str, tokens: int) -> Optional[Path]:
    name = getattr(model.config, "_name_or_path", "") or ""
    if not name:
        return None  # built in memory (the tests' tiny model): its weights are not identified by a name
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    tag = hashlib.sha1(f"{name}|{dtype}|{text}|{tokens}".encode()).hexdigest()[:12]
    root = os.environ.get("KVATLAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvatlas")
    return Path(root) / "calibration" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-60:]}-{text}-{tokens}-{tag}.pt"


@torch.no_grad()
def calibration_steps(model, tokenizer=None, text: str = "stdlib", tokens: int = 1024) -> list[Step]:
    """One dense Step per layer of an uncompressed prefill of `tokens` tokens of calibration `text`."""
    if tokenizer is None and text in ("stdlib", "passkey"):
        text = "random"  # the documented fallback, memoised and cached under its own name
    per_model = _memo.setdefault(model, {})
    if (text, tokens) not in per_model:
        path = _disk_path(model, text, tokens)
        if path is not None and path.exists():
            rec = torch.load(path, map_location="cpu")
        else:
            from reference_impls.replay import record_prefill

            vocab = getattr(model.config.get_text_config(), "vocab_size", None)
            ids = calibration_ids(text, tokens, tokenizer, vocab)
            r = record_prefill(model, ids)
            rec = {"q": r.queries, "k": r.keys, "v": r.values, "scaling": r.scaling}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                torch.save(rec, tmp)
                tmp.replace(path)
        per_model[(text, tokens)] = rec
    rec = per_model[(text, tokens)]
    device = next(model.parameters()).device
    return [Step.dense(q.to(device), k.to(device), v.to(device), scaling=rec["scaling"], layer_idx=i)
            for i, (q, k, v) in enumerate(zip(rec["q"], rec["k"], rec["v"]))]
