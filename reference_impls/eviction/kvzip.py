"""KVzip: score each cached pair by the most attention it gets while the model repeats the context from its own
cache, then evict the lowest-scored pairs across every layer and head at once (query-agnostic).

Paper: Jang-Hyun Kim, Jinuk Kim, Sangwoo Kwon, Jae W. Lee, Sangdoo Yun, Hyun Oh Song, "KVzip: Query-Agnostic KV Cache
Compression with Context Reconstruction", arXiv 2505.23416 (NeurIPS 2025), Section 3 and Appendix A, Algorithm 1 (KV
importance scoring): after the prefill, the input "repeat prompt + context" is forwarded against the full cache
(teacher-forced reconstruction, in chunks of m = 2K context tokens); a pair's score S[l, h, i] is the maximum, over the
input's queries and the G query heads of KV head h, of the attention it receives, the softmax running over the
chunk's keys and the input's own; pairs below the global quantile of S (non-uniform over layers and heads) are evicted.
Official code: https://github.com/snu-mllab/KVzip (`model/wrapper.py` `self_task`/`scoring`: prompts, 2000-token
chunks, 8-token overlap; `attention/score.py` `_get_score`: keys = system prompt + chunk + repeat input, max over group
and queries; `_threshold`: one threshold over every layer and head, "pair" level; `_threshold_uniform`: "pair-uniform").

How: at the compressing pass the stores read `Model.token_ids` (the prefilled prompt) and run `Model.trace` on the
prompt followed by each chunk's repeat input (one uncompressed forward per chunk, shared by every layer). The global
selection is expressed as a scorer for the `Threshold` head policy (the default): the pairs among the L H_kv b best
(b = round(n / ratio), what uniform eviction keeps) score S, the others S - 2, and every head keeps its pairs >= 0.
The lift keeps the order of S, so heads="uniform" is the official "pair-uniform" level and heads="adaptive" Ada-KV's.
Deviations:
(1) No system prompt apart: the official code scores only the context and never evicts the system prompt before it;
    here the whole prefilled prompt (chat template included) is repeated and scored, its first `n_sink` tokens kept
    (kvpress's KVzipPress keeps 4 sinks and counts them in the budget, as here).
(2) Prompts: the official wording ("Repeat the previous context exactly." for the first chunk, then "Repeat the part of
    the previous context exactly, starting with" + the previous chunk's last 8 tokens) plus the chat template's end of
    turn and assistant header (kvpress reads it from the tokenizer's template, as here); the paper writes "Repeat the
    previous context:". Without a tokenizer (random-weight test models) the prompt is empty: the context, then itself.
(3) The softmax is in fp32 (official: the model's dtype). Batches are scored row by row, each row as if alone.
(4) One extra uncompressed forward of prompt + repeat input per chunk (`Model.trace`); the official code forwards
    only the repeat input against the cache it already holds: same attention, more compute here.
Presets: chunk_size 2000 (official `self_task`; the paper's 2K, kvpress 2048), n_sink 4 (kvpress).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.eviction.policies import Threshold
from reference_impls.heads.base import SplitStore

__all__ = ["KVzip", "kvzip_scores", "repeat_inputs"]

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk quoted in a later chunk's prompt (official `prev_postfix_size`)
LIFT = 2.0  # scores are probabilities in [0, 1]: S - LIFT < 0 <= S tells the selected pairs apart
_LAST: dict = {}  # the last chunk scored: its trace (memoised per model by Model.trace), key and scores


def kvzip_scores(step: Step, m: int, start: int, end: int, n_sink: int = 0) -> Tensor:
    """Max attention each key in [start, end) receives from the last m queries of `step` (the repeat input).

    step: a dense step of prompt + repeat input (T keys, the repeat input's own m last); the softmax of each repeat
    query runs over the first n_sink keys, the chunk [start, end) and the repeat input's keys up to itself (Alg. 1's
    subsampled keys). Returns (B, H_kv, end - start): the max over the m queries and the G heads of each group.
    """
    T = step.keys.shape[2]
    pos = torch.arange(T, device=step.keys.device)
    seen = (pos < n_sink) | ((pos >= start) & (pos < end)) | (pos >= T - m)  # (T,)
    causal = pos[None, :] <= pos[T - m:, None]  # (m, T): repeat query i is token T - m + i
    rec = dataclasses.replace(step.last(m), _mask=(causal & seen)[None, None])
    probs = rec.probs()[..., start:end]  # (B, H, m, end - start)
    B, H, _, n = probs.shape
    H_kv = step.keys.shape[1]
    return probs.view(B, H_kv, H // H_kv, m, n).amax(dim=(2, 3))


def repeat_inputs(context: Tensor, tokenizer, chunk_size: int) -> list[tuple[int, int, Tensor]]:
    """The reconstruction inputs of a context (1, n): one (start, end, ids (1, m)) per chunk of `chunk_size` tokens,
    ids = prompt + the template's assistant header + the chunk (Alg. 1; Deviation 2 for the wording)."""
    def enc(text: str) -> Tensor:
        return torch.tensor([tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)

    none = torch.zeros(1, 0, dtype=torch.long)
    header = none
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        mark = "\x00KVZIP\x00"  # the text the template puts after a user turn: end of turn, assistant header
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                             add_generation_prompt=True)
        header = enc(text.split(mark, 1)[1])
    out = []
    for start in range(0, context.shape[1], chunk_size):
        end = min(start + chunk_size, context.shape[1])
        if tokenizer is None:
            prompt = none
        elif start == 0:
            prompt = enc(FIRST)
        else:
            prompt = torch.cat([enc(LATER), context[:, max(start - OVERLAP, 0):start].cpu()], dim=1)
        out.append((start, end, torch.cat([prompt, header, context[:, start:end].cpu()], dim=1)))
    return out


@dataclass
class KVzip(EvictionMethod):
    """Context-reconstruction scores, one global selection over every layer and head; compresses the prefill once.

    Args (ratio, budget: see EvictionMethod; L H_kv b pairs are kept in all, b = budget or round(n / ratio)):
        heads: Threshold() (default: the paper's non-uniform pair-level eviction), "uniform" (the official
            "pair-uniform" level: b per head) or "adaptive". layers: applies under budgeted head policies.
        chunk_size: context tokens per reconstruction forward. n_sink: first tokens always kept (Deviation 1).
    """

    heads: Any = field(default_factory=Threshold)
    chunk_size: int = 2000
    n_sink: int = 4
    _model: Optional[Model] = field(default=None, init=False, repr=False, compare=False)
    _memo: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        for knob, ok, allowed in (("chunk_size", isinstance(self.chunk_size, int) and self.chunk_size >= 1, "an int >= 1"),
                                  ("n_sink", isinstance(self.n_sink, int) and self.n_sink >= 0, "an int >= 0")):
            if not ok:
                raise ValueError(f"KVzip: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        if model.trace is None or model.token_ids is None:
            raise ValueError("KVzip: needs Model.trace and Model.token_ids (build the cache with KVCache)")
        bound = getattr(self, "_bound", None)
        if layer_idx == 0 or bound is None or bound._model is not model:  # one copy per cache: its layers share S
            bound = replace(self)
            bound._model = model
            self._bound = bound
        return SplitStore(bound, layer_idx, model)  # dense again when every pair is kept

    def global_scores(self, n: Tensor) -> list[Tensor]:
        """Per row, (L, H_kv, n_b) lifted scores of the prompt's pairs (memoised per prompt)."""
        model = self._model
        pos = torch.arange(int(n.max()), device=n.device)
        ids = model.token_ids(torch.where(pos < n[:, None], pos, -1))  # (B, max n), -1 beyond a row's prompt
        key = tuple(tuple(row[row >= 0].tolist()) for row in ids)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        rows = []
        for b, row in enumerate(ids):
            ctx = row[: int(n[b])][None]
            S = None
            for start, end, rep in repeat_inputs(ctx, model.tokenizer, self.chunk_size):
                steps = model.trace(torch.cat([ctx.cpu(), rep], dim=1))
                chunk = (rep.shape[1], start, end, self.n_sink)
                if _LAST.get("steps") is not steps or _LAST.get("chunk") != chunk:  # ratios of one prompt share S
                    _LAST.update(steps=steps, chunk=chunk, S=torch.stack(
                        [kvzip_scores(s, rep.shape[1], start, end, self.n_sink)[0].cpu() for s in steps]))
                S = _LAST["S"].clone() if S is None else torch.cat([S, _LAST["S"]], dim=-1)  # (L, H_kv, n_b)
            S[..., : self.n_sink] = 1.0  # sinks: the highest possible score, counted in the budget (kvpress)
            b_u = self.budget if self.budget is not None else max(round(int(n[b]) / self.ratio), 1)
            k = min(S.shape[0] * S.shape[1] * b_u, S.numel())  # what uniform eviction keeps over the model
            chosen = torch.zeros(S.numel(), dtype=torch.bool)
            chosen[S.flatten().topk(k).indices] = True
            rows.append(torch.where(chosen.view_as(S), S, S - LIFT))
        self._memo = (key, rows)
        return rows

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        rows = self.global_scores(step.n_real())
        pos = step.positions.clamp(min=0)  # (B, H_kv, T); holes are masked by the store
        return torch.stack([r[step.layer_idx].to(pos.device).gather(-1, p) for r, p in zip(rows, pos)])
