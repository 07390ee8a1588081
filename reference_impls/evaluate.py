"""Apples-to-apples evaluation: same model, prompts, batch (1) and machine for every method and ratio.

Each prompt is prefilled once with the full cache (`record_prefill`); every method then builds its cache
from that record (`cache_from_record`, exact because methods compress after the attention that used the
full states), takes the rest of the prompt live (the question, in the query-agnostic setting) and decodes
greedily. Bytes are measured from the tensors each cache holds; the ratio is reported as achieved.
`prefill_s` is the shared prefill's time plus this method's own compression time.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

from reference_impls.base import KVMethod
from reference_impls.data import is_correct
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.replay import cache_from_record, record_prefill

__all__ = ["evaluate", "summarize", "SETTINGS"]

SETTINGS = ("query-agnostic", "query-aware")


@torch.no_grad()
def evaluate(model, tokenizer, methods: dict[str, Callable[[float], KVMethod]], ratios: Iterable[float],
             samples: list[dict], settings: Iterable[str] = SETTINGS, max_new_tokens: int = 8,
             progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per (sample, setting, method, ratio): correctness, bytes, achieved ratio, times.

    `methods` maps a name to a factory taking the target ratio (e.g. `StreamingLLM.from_ratio`).
    """
    ratios, settings = list(ratios), list(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"settings: unknown {bad}; allowed: {list(SETTINGS)}")
    eos = eos_ids(model, tokenizer)
    rows = []
    for i, sample in enumerate(samples):
        ctx, qst = build_prompt(tokenizer, sample["context"], sample["question"], sample.get("answer_prefix", ""))
        for setting in settings:
            aware = setting == "query-aware"
            first = torch.cat([ctx, qst], dim=1) if aware else ctx
            record = record_prefill(model, first)
            for name, factory in methods.items():
                for ratio in ratios:
                    method = factory(ratio)
                    t0 = time.perf_counter()
                    cache = cache_from_record(model, method, record, tokenizer)
                    compress_s = time.perf_counter() - t0
                    gen = greedy_generate(model, cache, [] if aware else [qst], max_new_tokens, eos,
                                          logits=record.logits if aware else None)
                    answer = tokenizer.decode([t for t in gen.tokens if t not in eos], skip_special_tokens=True)
                    n_dec = len(gen.tokens) - 1
                    rows.append({
                        "sample": i, "depth": sample.get("depth"), "setting": setting, "method": name,
                        "target_ratio": ratio, "achieved_ratio": gen.full_kv_bytes / gen.kv_bytes,
                        "kv_bytes": gen.kv_bytes, "full_kv_bytes": gen.full_kv_bytes,
                        "correct": is_correct(answer, sample["answer"]), "answer": answer.strip(),
                        "prompt_tokens": int(ctx.shape[1] + qst.shape[1]),
                        "prefill_s": record.seconds + compress_s + gen.prefill_s, "compress_s": compress_s,
                        "decode_tokens_per_s": n_dec / gen.decode_s if n_dec and gen.decode_s > 0 else None,
                    })
                    if progress:
                        progress(f"sample {i} {setting} {name} x{ratio}: {'ok' if rows[-1]['correct'] else 'miss'}")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean accuracy, achieved ratio and times per (setting, method, target ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"], r["target_ratio"]), []).append(r)
    out = []
    for (setting, method, ratio), rs in sorted(groups.items()):
        dec = [r["decode_tokens_per_s"] for r in rs if r["decode_tokens_per_s"]]
        out.append({
            "setting": setting, "method": method, "target_ratio": ratio, "n": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "achieved_ratio": sum(r["achieved_ratio"] for r in rs) / len(rs),
            "prefill_s": sum(r["prefill_s"] for r in rs) / len(rs),
            "decode_tokens_per_s": sum(dec) / len(dec) if dec else None,
        })
    return out
