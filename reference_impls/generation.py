"""Prompts and decoding: the chat-template prompt split where the question starts, greedy decoding with a
KVCache, and one prompt end to end with its measured bytes and times (the CLI's and the benchmark's record).

Query-agnostic (kvpress) and query-aware (SnapKV paper) settings differ only in what is prefilled before the
cache compresses: the context alone, or context and question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import UNIT_BYTES, KVMethod, Model
from reference_impls.integration import KVCache

__all__ = ["Generation", "build_prompt", "eos_ids", "greedy_generate", "run_sample", "shorten_prompt"]


def build_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[Tensor, Tensor]:
    """Chat-template prompt, split where the question starts: (context_ids, question_ids), each (1, n).

    The user turn is the context, a blank line, then the question; the question part carries the rest
    of the template (end of turn, assistant header) and the optional `answer_prefix` that starts the
    assistant's reply, so the two parts concatenate to the full prompt.
    """
    sep = "\n\n"
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + sep + question}],
                                         tokenize=False, add_generation_prompt=True) + answer_prefix
    cut = text.index(context) + len(context) + len(sep)
    ctx = tokenizer(text[:cut], add_special_tokens=False, return_tensors="pt").input_ids
    qst = tokenizer(text[cut:], add_special_tokens=False, return_tensors="pt").input_ids
    return ctx, qst


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    kv_bytes: int  # measured right after the compressing pass
    full_kv_bytes: int  # a full 16-bit cache of the same tokens (the seeds' unit, `UNIT_BYTES`)
    kv_bytes_end: int  # measured after the last generated token
    full_kv_bytes_end: int
    #: the most held at once: the prompt's uncompressed states, which the first pass's attention uses before
    #: any method here compresses (in the model's dtype), or the cache after compressing or at the end
    peak_kv_bytes: int = 0
    #: mean bytes attention read from the cache per decoded token (`KVCache.read_nbytes`): below kv_bytes_end
    #: only for retrieval methods, which hold more than they read; None for the others (they read all they hold)
    read_kv_bytes: Optional[float] = None


@torch.inference_mode()  # bit-identical to no_grad, with less bookkeeping per op: see the docstring
def greedy_generate(model, cache: KVCache, prompt_parts: list[Tensor], max_new_tokens: int,
                    eos_token_ids: Optional[set[int]] = None, logits: Optional[Tensor] = None,
                    stop: Optional[Callable[[list[int]], bool]] = None) -> Generation:
    """Prefill the prompt parts one forward each (the cache compresses after the first), then decode greedily.

    Query-aware: one part (context + question). Query-agnostic: [context, question]. A cache built by
    `replay.cache_from_record` passes the remaining parts and the recorded `logits` (1, 1, vocab) instead.
    `stop(tokens)` ends decoding early when True (e.g. at the first newline when only the first line is scored).

    Runs under `torch.inference_mode`, as serving stacks do: the same kernels as under `no_grad`, so the same
    logits, without the version counters and view tracking of every tensor op. A store that scores every decoding
    step runs dozens of small ops per layer, so this takes ~20-30% off its per-step cost on a CPU
    (`scripts/bench_decode_step.py --model`). The tensors the cache then holds are inference tensors: feed more
    tokens through it under `torch.inference_mode` too (an in-place update outside it is refused by torch).
    """
    eos_token_ids = eos_token_ids or set()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    kv_bytes = full = uncompressed = None
    if cache.compressed_at is not None:  # built by cache_from_record: already compressed, measure now
        kv_bytes, full, uncompressed = cache.nbytes(), cache.full_nbytes(UNIT_BYTES), cache.full_nbytes()
    for part in prompt_parts:
        logits = model(input_ids=part.to(device), cache=cache, use_cache=True).logits
        if kv_bytes is None:
            kv_bytes, full, uncompressed = cache.nbytes(), cache.full_nbytes(UNIT_BYTES), cache.full_nbytes()
    token = int(logits[0, -1].argmax())
    prefill_s = time.perf_counter() - t0
    tokens = [token]
    read = []
    t1 = time.perf_counter()
    while len(tokens) < max_new_tokens and token not in eos_token_ids and not (stop and stop(tokens)):
        logits = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits
        if (r := cache.read_nbytes()) is not None:
            read.append(r)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    decode_s = time.perf_counter() - t1
    end = cache.nbytes()
    return Generation(tokens, prefill_s, decode_s, kv_bytes, full, end, cache.full_nbytes(UNIT_BYTES),
                      max(uncompressed, kv_bytes, end), sum(read) / len(read) if read else None)


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end generation: the tokenizer's eos and the model's generation config's."""
    cfg = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id} | set(cfg if isinstance(cfg, (list, tuple)) else [cfg])
    return {i for i in ids if i is not None}


def template_head(tokenizer, context: Tensor) -> int:
    """Tokens of the chat template before the user's text at the start of `context` (1, n) (system prompt, turn
    header): LLMLingua-style methods compress the user's context, never the template. 0 without a template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                         add_generation_prompt=True)
    head = tokenizer(text[: text.index("\x00")], add_special_tokens=False).input_ids
    return len(head) if context[0, : len(head)].tolist() == head else 0


def shorten_prompt(method: KVMethod, context: Tensor, question: Tensor, query_aware: bool, model: Model
                   ) -> tuple[Tensor, int]:
    """(context ids the cache gets, tokens removed): `method.compress_prompt` on the user's text (the template's
    head is kept), checked. The question is shown to the method only in the query-aware setting."""
    h = template_head(model.tokenizer, context)
    body = context[:, h:]
    short = method.compress_prompt(body, question if query_aware else None, model)
    n = body.shape[1]
    if short is body:
        return context, 0
    if not (isinstance(short, Tensor) and short.dim() == 2 and short.shape[0] == context.shape[0]
            and 1 <= short.shape[1] <= n and not short.is_floating_point()):
        got = tuple(short.shape) if isinstance(short, Tensor) else type(short).__name__
        raise ValueError(f"{type(method).__name__}.compress_prompt must return token ids of shape (1, n') with "
                         f"1 <= n' <= {n}, got {got}")
    return torch.cat([context[:, :h], short.to(context.dtype)], dim=1), n - short.shape[1]


def run_sample(model, tokenizer, method: KVMethod, context: str, question: str, *, query_aware: bool = False,
               max_new_tokens: int = 32, answer_prefix: str = "") -> dict[str, Any]:
    """One prompt end to end: the answer and the measured bytes and times (the CLI's output record)."""
    ctx, qst = build_prompt(tokenizer, context, question, answer_prefix)
    cache = KVCache(model, method, tokenizer)
    t0 = time.perf_counter()
    short, cache.elided = shorten_prompt(method, ctx, qst, query_aware, cache.model_info)
    compress_s = time.perf_counter() - t0
    parts = [torch.cat([short, qst], dim=1)] if query_aware else [short, qst]
    eos = eos_ids(model, tokenizer)
    gen = greedy_generate(model, cache, parts, max_new_tokens, eos_token_ids=eos)
    text_tokens = [t for t in gen.tokens if t not in eos]
    n_decoded = max(len(gen.tokens) - 1, 0)
    return {
        "answer": tokenizer.decode(text_tokens, skip_special_tokens=True).strip(),
        "kv_bytes": gen.kv_bytes,
        "full_kv_bytes": gen.full_kv_bytes,
        "achieved_ratio": gen.full_kv_bytes / gen.kv_bytes if gen.kv_bytes else float("nan"),
        "kv_bytes_end": gen.kv_bytes_end,
        "full_kv_bytes_end": gen.full_kv_bytes_end,
        "peak_kv_bytes": gen.peak_kv_bytes,
        "read_kv_bytes": gen.read_kv_bytes,
        "prompt_tokens": int(ctx.shape[1] + qst.shape[1]),
        "compressed_tokens": int(ctx.shape[1] + (qst.shape[1] if query_aware else 0)),
        "prompt_kept_tokens": int(short.shape[1] + qst.shape[1]),
        "prefill_s": compress_s + gen.prefill_s,
        "decode_tokens_per_s": n_decoded / gen.decode_s if gen.decode_s > 0 and n_decoded else float("nan"),
        "new_tokens": len(gen.tokens),
    }
