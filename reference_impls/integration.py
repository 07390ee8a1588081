"""All transformers glue, in one module: the cache, the attention function, the prompt and the decode loop.

Tested with transformers 5.5-5.24 (the 5.x per-layer Cache API; `cache_position` is gone since 5.5 and the
`past_key_values` keyword became `cache` in 5.24, with the old name kept as an alias). Method files never
import transformers; they see only `reference_impls.base`.

How a method runs inside a Hugging Face model:

* `KVCache(model, method)` is a `transformers.Cache` holding one `LayerStore` per layer. It reports the
  number of tokens *seen* (`get_seq_length`), so positions (RoPE) continue from the true length after
  tokens are dropped, and `model.generate(cache=...)` feeds only the tokens it has not seen.
* `prepare_model(model)` switches the model to the "kvatlas" attention function. Keys/values come out of
  `store.append`, the mask is built from the stores' slots (so layers and heads may keep different
  numbers of tokens, and left padding stays right after eviction), and after attention the store gets
  the queries (`store.after_attention(step)`): that is where eviction, merging or quantization happen,
  after the attention that used the full states, as the papers do.
* Query-agnostic (kvpress) and query-aware (SnapKV paper) settings differ only in what is prefilled
  before the cache compresses: the context alone, or context and question.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from reference_impls.base import KVMethod, LayerStore, Step, repeat_kv

__all__ = ["KVCache", "PrefillRecord", "prepare_model", "build_prompt", "greedy_generate", "run_sample",
           "record_prefill", "ATTN_NAME"]

ATTN_NAME = "kvatlas"
_active = threading.local()  # the KVCache whose update() ran last: its layer's attention comes next;
# also the input ids of the forward pass now running (set by a pre-hook on the input embedding)


class _Layer(CacheLayerMixin):
    """Adapter between transformers' per-layer protocol and one LayerStore."""

    is_sliding = False
    is_croppable = False  # assisted decoding would crop; an evicting store cannot un-evict

    def __init__(self, store: LayerStore):
        super().__init__()
        self.store = store
        self.seen = 0  # tokens seen, the true sequence length
        self.full_bytes = 0  # what a full cache would hold for them, set when attention runs
        self.pending: Optional[tuple[Tensor, Tensor, Optional[Tensor], int]] = None

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.is_initialized = True
        q = key_states.shape[2]
        k, v, slots = self.store.append(key_states, value_states)
        self.seen += q
        self.pending = (k, v, slots, q)
        return k, v

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Rule: (rows update() will return, seen - held). Our attention builds its own mask and reads
        # from transformers' mask only the padding of the new tokens (its last q columns).
        held = self.store_rows()
        return held + query_length, self.seen - held

    def store_rows(self) -> int:
        slots = self.store.kept_slots()
        return self.seen if slots is None else slots.shape[-1]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise RuntimeError("KVCache cannot be reset; build a new KVCache(model, method)")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("KVCache does not support beam search; use greedy or sampling")


class KVCache(Cache):
    """A transformers Cache whose layers are a method's stores.

    Args:
        model: the (causal LM) model; switched to the "kvatlas" attention function.
        method: any KVMethod.

    `compress_next` arms compression for the next forward pass (True at start, so the prefill
    compresses); it is cleared when that pass ends. Set it again to compress a later chunk.
    """

    def __init__(self, model, method: KVMethod):
        if not isinstance(method, KVMethod):
            raise TypeError(f"method must be a reference_impls KVMethod, got {type(method).__name__}")
        prepare_model(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = config.num_hidden_layers
        self.method = method
        super().__init__(layers=[_Layer(method.new_layer(i, self.num_layers)) for i in range(self.num_layers)])
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        self._rotary = getattr(decoder, "rotary_emb", None)  # Llama/Qwen/Mistral-style RoPE module
        self.step_rope = self.rope if self._rotary is not None else None  # what Step.rope gets
        self.compress_next = True
        self.pad_valid: Optional[Tensor] = None  # (B, seen) bool, like the 2D attention mask
        self.token_ids: Optional[Tensor] = None  # (B, seen) int64; None once a pass came without ids
        self._ids_known = True
        self.compressed_at: Optional[int] = None  # tokens seen when the armed pass ended

    # transformers' Cache protocol ---------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _active.cache = self
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def crop(self, max_length: int):
        raise NotImplementedError("KVCache is not croppable (tokens may have been evicted)")

    @property
    def is_compileable(self) -> bool:
        return False

    # measurement --------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the stores hold now (keys, values, kept indices, codes, scales ...)."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a full cache would hold for the tokens seen: 2 * L * B * H_kv * T * D * itemsize."""
        return sum(layer.full_bytes for layer in self.layers)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The model's (cos, sin) for positions (B, T), fp32, (B, T, D): what its attention layers applied."""
        x = torch.empty(0, dtype=torch.float32, device=positions.device)
        return self._rotary(x, positions)

    # called by the attention function -------------------------------------------------------------
    def _attend(self, module, query: Tensor, hf_mask: Optional[Tensor], scaling: float) -> Tensor:
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        k, v, slots, q_len = layer.pending
        layer.pending = None
        B, H_kv, T, D = k.shape
        # full-cache bytes per layer, from the incoming states' shape and dtype (the baseline's layout)
        layer.full_bytes = 2 * B * H_kv * layer.seen * D * k.element_size()
        if layer_idx == 0:
            self._extend_padding(hf_mask, B, q_len, k.device)
            self._extend_ids(getattr(_active, "ids", None), B, q_len)
        seen_before = layer.seen - q_len
        padded = not bool(self.pad_valid.all())
        if slots is None and not padded:
            mask = None
            valid = torch.ones(B, H_kv, T, dtype=torch.bool, device=k.device)
        else:
            s = slots if slots is not None else torch.arange(T, device=k.device).expand(B, H_kv, T)
            valid = (s >= 0) & torch.gather(self.pad_valid[:, None, :].expand(B, H_kv, -1), 2, s.clamp(min=0))
            q_slots = torch.arange(seen_before, layer.seen, device=k.device)
            mask = (s[:, :, None, :] <= q_slots[None, None, :, None]) & valid[:, :, None, :]
            # a padding query sees nothing; let it see everything rather than produce NaN (its output is unused)
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        out = _sdpa(query, k, v, mask, scaling)
        step = Step(queries=query, keys=k, values=v, slots=slots, mask=mask, valid=valid, scaling=scaling,
                    compress=self.compress_next, layer_idx=layer_idx, num_layers=self.num_layers, seen=layer.seen,
                    pad_valid=self.pad_valid if padded else None,
                    rope=self.step_rope, token_ids=self.token_ids)
        layer.store.after_attention(step)
        if layer_idx == self.num_layers - 1 and self.compress_next:
            self.compress_next = False
            self.compressed_at = layer.seen
        return out

    def _extend_padding(self, hf_mask: Optional[Tensor], B: int, q_len: int, device) -> None:
        if hf_mask is None or hf_mask.dtype != torch.bool:
            new = torch.ones(B, q_len, dtype=torch.bool, device=device)
        else:  # the last query is a real token under left padding; its row tells which new keys are real
            new = hf_mask[:, 0, -1, -q_len:].expand(B, q_len)
        self.pad_valid = new if self.pad_valid is None else torch.cat([self.pad_valid, new], dim=1)


    def _extend_ids(self, ids: Optional[Tensor], B: int, q_len: int) -> None:
        _active.ids = None  # consumed: a later pass fed embeddings must not reuse these
        if ids is None or tuple(ids.shape) != (B, q_len):
            self._ids_known, self.token_ids = False, None  # fed embeddings: ids unknown from here on
        elif self._ids_known:
            ids = ids.long()
            self.token_ids = ids if self.token_ids is None else torch.cat([self.token_ids, ids], dim=1)


def _record_ids(module, args, kwargs):
    """Pre-hook on the input embedding: the ids of the pass now running, for `Step.token_ids`."""
    ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
    _active.ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scaling: float) -> Tensor:
    """Attention over (B, H_kv, T, D) keys for (B, H, q, D) queries -> (B, q, H, D)."""
    groups = q.shape[1] // k.shape[1]
    q_len, T = q.shape[2], k.shape[2]
    if mask is None and q_len > 1 and q_len != T:  # a later chunk of a dense cache: causal with offset
        mask = torch.ones(q_len, T, dtype=torch.bool, device=q.device).tril(T - q_len)[None, None]
    if mask is not None:
        mask = repeat_kv(mask, groups) if mask.shape[1] > 1 else mask
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                             scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                             is_causal=q_len > 1, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _kvatlas_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as "kvatlas"; plain SDPA when the cache is not a KVCache."""
    cache = getattr(_active, "cache", None)
    if cache is None or cache.layers[module.layer_idx].pending is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = module.scaling if scaling is None else scaling
    return cache._attend(module, query, attention_mask, scaling), None


def prepare_model(model) -> None:
    """Register the "kvatlas" attention (and its mask, the SDPA one) and switch the model to it."""
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _kvatlas_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    emb = model.get_input_embeddings()
    if not getattr(emb, "_kvatlas_ids_hook", False):
        # clear at the start of every forward, so ids embedded outside it are never taken for this pass's
        model.register_forward_pre_hook(lambda module, args: setattr(_active, "ids", None))
        emb.register_forward_pre_hook(_record_ids, with_kwargs=True)
        emb._kvatlas_ids_hook = True


# ------------------------------------------------------------------------------------------------
# Prompts and decoding
# ------------------------------------------------------------------------------------------------
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
    full_kv_bytes: int
    kv_bytes_end: int  # measured after the last generated token
    full_kv_bytes_end: int


@torch.no_grad()
def greedy_generate(model, cache: KVCache, prompt_parts: list[Tensor], max_new_tokens: int,
                    eos_token_ids: Optional[set[int]] = None, logits: Optional[Tensor] = None) -> Generation:
    """Prefill the prompt parts one forward each (the cache compresses after the first), then decode greedily.

    Query-aware: one part (context + question). Query-agnostic: [context, question]. A cache built by
    `cache_from_record` passes the remaining parts and the recorded `logits` (1, 1, vocab) instead.
    """
    eos_token_ids = eos_token_ids or set()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    kv_bytes = full = None
    if cache.compressed_at is not None:  # built by cache_from_record: already compressed, measure now
        kv_bytes, full = cache.nbytes(), cache.full_nbytes()
    for part in prompt_parts:
        logits = model(input_ids=part.to(device), cache=cache, use_cache=True).logits
        if kv_bytes is None:
            kv_bytes, full = cache.nbytes(), cache.full_nbytes()
    token = int(logits[0, -1].argmax())
    prefill_s = time.perf_counter() - t0
    tokens = [token]
    t1 = time.perf_counter()
    while len(tokens) < max_new_tokens and token not in eos_token_ids:
        logits = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    decode_s = time.perf_counter() - t1
    return Generation(tokens, prefill_s, decode_s, kv_bytes, full, cache.nbytes(), cache.full_nbytes())


def _eos_ids(model, tokenizer) -> set[int]:
    cfg = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id} | set(cfg if isinstance(cfg, (list, tuple)) else [cfg])
    return {i for i in ids if i is not None}


def run_sample(model, tokenizer, method: KVMethod, context: str, question: str, *, query_aware: bool = False,
               max_new_tokens: int = 32, answer_prefix: str = "") -> dict[str, Any]:
    """One prompt end to end: the answer and the measured bytes and times (the CLI's output record)."""
    ctx, qst = build_prompt(tokenizer, context, question, answer_prefix)
    parts = [torch.cat([ctx, qst], dim=1)] if query_aware else [ctx, qst]
    cache = KVCache(model, method)
    eos = _eos_ids(model, tokenizer)
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
        "prompt_tokens": int(ctx.shape[1] + qst.shape[1]),
        "compressed_tokens": int(ctx.shape[1] + (qst.shape[1] if query_aware else 0)),
        "prefill_s": gen.prefill_s,
        "decode_tokens_per_s": n_decoded / gen.decode_s if gen.decode_s > 0 and n_decoded else float("nan"),
        "new_tokens": len(gen.tokens),
    }


# ------------------------------------------------------------------------------------------------
# Prefill once, compress many (the benchmark's shared prefill)
# ------------------------------------------------------------------------------------------------
@dataclass
class PrefillRecord:
    """Per-layer (queries, keys, values) of one uncompressed prefill, and its last logits."""

    queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    scaling: float
    logits: Tensor  # (1, 1, vocab) at the last prompt position
    seconds: float  # wall time of the prefill
    input_ids: Optional[Tensor] = None  # (1, T)
    #: ratio-independent results shared by every cache built from this record (`Step.memo`): stores' own
    #: entries, and ("probs", layer) = the prefill's attention weights once some method asked for them
    memo: dict = field(default_factory=dict)


class _Recorder(LayerStore):
    def __init__(self, sink: dict, layer_idx: int):
        self.sink, self.layer_idx = sink, layer_idx

    def append(self, k, v):
        self.sink["k"][self.layer_idx], self.sink["v"][self.layer_idx] = k, v
        return k, v, None

    def after_attention(self, step: Step) -> None:
        self.sink["q"][self.layer_idx] = step.queries
        self.sink["scaling"] = step.scaling

    def nbytes(self) -> int:
        return 0


class _RecordMethod(KVMethod):
    name = "record"

    def __init__(self, sink):
        self.sink = sink

    def new_layer(self, layer_idx, num_layers):
        return _Recorder(self.sink, layer_idx)


@torch.no_grad()
def record_prefill(model, input_ids: Tensor) -> PrefillRecord:
    """Run one uncompressed prefill (batch 1) and keep every layer's queries, keys and values."""
    n = model.config.num_hidden_layers
    sink: dict = {"q": [None] * n, "k": [None] * n, "v": [None] * n}
    cache = KVCache(model, _RecordMethod(sink))
    t0 = time.perf_counter()
    logits = model(input_ids=input_ids.to(next(model.parameters()).device), cache=cache, use_cache=True).logits
    return PrefillRecord(sink["q"], sink["k"], sink["v"], sink["scaling"], logits[:, -1:], time.perf_counter() - t0,
                         input_ids=cache.token_ids)


def cache_from_record(model, method: KVMethod, record: PrefillRecord) -> KVCache:
    """The cache `method` would hold after a live prefill: each store gets the same append and step.

    Exact because stores only act after the attention that used the full states (a test checks it).
    """
    cache = KVCache(model, method)
    cache.token_ids = record.input_ids
    for i, layer in enumerate(cache.layers):
        k, v = record.keys[i], record.values[i]
        q_len = k.shape[2]
        layer.pending = None
        kk, vv, slots = layer.store.append(k, v)
        layer.seen = q_len
        layer.full_bytes = 2 * k.shape[0] * k.shape[1] * q_len * k.shape[3] * k.element_size()
        B, H_kv = k.shape[:2]
        same = kk is k  # the store handed attention the recorded keys themselves (not, say, de-quantized ones)
        step = Step(queries=record.queries[i], keys=kk, values=vv, slots=slots, mask=None,
                    valid=torch.ones(B, H_kv, kk.shape[2], dtype=torch.bool, device=k.device),
                    scaling=record.scaling, compress=True, layer_idx=i, num_layers=cache.num_layers, seen=q_len,
                    rope=cache.step_rope, token_ids=cache.token_ids,
                    memo=record.memo if same else None, _probs=record.memo.get(("probs", i)) if same else None)
        layer.store.after_attention(step)
        if same and step._probs is not None:
            record.memo.setdefault(("probs", i), step._probs)
    cache.pad_valid = torch.ones(record.keys[0].shape[0], record.keys[0].shape[2], dtype=torch.bool,
                                 device=record.keys[0].device)
    cache.compress_next = False
    cache.compressed_at = record.keys[0].shape[2]
    return cache
