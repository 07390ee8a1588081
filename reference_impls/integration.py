"""All transformers glue, in one module: the cache and the attention function (prompts and decoding live in
`generation.py`, the recorded prefill in `replay.py`; neither imports transformers).

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
  after the attention that used the full states, as the papers do. Between the two, `store.mix(step, out)`
  may change the attention output before the output projection (identity unless a method overrides it).
* Query-agnostic (kvpress) and query-aware (SnapKV paper) settings differ only in what is prefilled
  before the cache compresses: the context alone, or context and question.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from reference_impls.base import KVMethod, LayerStore, Model, Step, repeat_kv

__all__ = ["KVCache", "model_info", "prepare_model", "ATTN_NAME"]

ATTN_NAME = "kvatlas"
_TRACES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its last trace {"ids", "steps"}
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
        self.full_elems = 0  # elements a full cache would hold for them (2 B H_kv T D), set when attention runs
        self.itemsize = 0  # bytes per element of the incoming states (the model's dtype)
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
        tokenizer: the prompts' tokenizer, for methods that treat token classes apart (FastGen); optional.

    `compress_next` arms compression for the next forward pass (True at start, so the prefill
    compresses); it is cleared when that pass ends. Set it again to compress a later chunk.
    """

    def __init__(self, model, method: KVMethod, tokenizer=None):
        if not isinstance(method, KVMethod):
            raise TypeError(f"method must be a reference_impls KVMethod, got {type(method).__name__}")
        prepare_model(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = config.num_hidden_layers
        self.method = method
        self.model_info = model_info(model, tokenizer)
        self.model_info.token_ids = self.ids_at
        super().__init__(layers=[_Layer(method.new_layer(i, self.model_info)) for i in range(self.num_layers)])
        self.model_info.stores[:] = [layer.store for layer in self.layers]
        self.elided = 0  # prompt tokens a prompt-compression method removed before the cache saw them
        self.compress_next = True
        self.since_compress = -1  # forward passes since the compressing pass (Step.since_compress)
        self.pad_valid: Optional[Tensor] = None  # (B, seen) bool, like the 2D attention mask; None while no padding
        self.token_ids: Optional[Tensor] = None  # (B, seen) int64; None once a pass came without ids
        self._ids_known = True
        self.compressed_at: Optional[int] = None  # tokens seen when the armed pass ended
        self._q_positions: Optional[Tensor] = None  # (B, q) this pass's query positions (-1 = padding)
        self._slot_pos: Optional[Tensor] = None  # (B, seen) position of each stream slot (-1 = padding)

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

    def full_nbytes(self, element_bytes: Optional[int] = None) -> int:
        """Bytes a full cache would hold for the tokens seen: 2 * L * B * H_kv * T * D * element_bytes (T counts
        the prompt tokens a prompt-compression method removed, `elided`).

        element_bytes: None for the model's own dtype (what `DynamicCache` would hold); `UNIT_BYTES` (2) for the
        seeds' 16-bit unit, which the benchmark's ratios are counted against.
        """
        return sum(layer.full_elems * (element_bytes or layer.itemsize) for layer in self.layers)

    def read_nbytes(self) -> Optional[int]:
        """Bytes the last forward pass's attention read from the stores (what retrieval methods selected, and what
        selecting cost; everything held for the other layers), or None when no store reads less than it holds."""
        reads = [layer.store.read_nbytes() for layer in self.layers]
        if all(r is None for r in reads):
            return None
        return sum(layer.store.nbytes() if r is None else r for layer, r in zip(self.layers, reads))

    # what methods may ask of the model (Model) -----------------------------------------------------
    def ids_at(self, positions: Tensor) -> Tensor:
        """Ids of the tokens at `positions` (B, ...) of each row (-1 -> -1); needs the model to be fed ids."""
        if self.token_ids is None:
            raise ValueError("the token ids are unknown: the model was fed embeddings (inputs_embeds)")
        if self.pad_valid is None:
            by_pos = self.token_ids
        else:  # left padding: position p of row b is its (p + 1)-th real token
            order = torch.argsort((~self.pad_valid).to(torch.uint8), dim=1, stable=True)
            by_pos = self.token_ids.gather(1, order)
        flat = positions.reshape(positions.shape[0], -1)
        ids = by_pos.gather(1, flat.clamp(min=0, max=by_pos.shape[1] - 1))
        return torch.where(flat >= 0, ids, -1).view_as(positions)

    # called by the attention function -------------------------------------------------------------
    def _begin_pass(self, hf_mask: Optional[Tensor], B: int, q_len: int, device) -> None:
        """Layer 0 of a forward pass: extend the padding record, the ids and the query positions."""
        seen = self.layers[0].seen  # this pass's tokens included
        self._extend_padding(hf_mask, B, q_len, seen, device)
        self._extend_ids(getattr(_active, "ids", None), B, q_len)
        self.since_compress = 0 if self.compress_next else self.since_compress + (self.since_compress >= 0)
        if self.pad_valid is None:
            self._slot_pos = None
            self._q_positions = torch.arange(seen - q_len, seen, device=device).expand(B, q_len)
        else:
            pos = self.pad_valid.long().cumsum(-1) - 1
            self._slot_pos = pos.masked_fill(~self.pad_valid, -1)
            self._q_positions = self._slot_pos[:, -q_len:]

    def _attend(self, module, query: Tensor, hf_mask: Optional[Tensor], scaling: float) -> Tensor:
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        k, v, slots, q_len = layer.pending
        layer.pending = None
        B, H_kv, T, D = k.shape
        # full-cache bytes per layer, from the incoming states' shape and dtype (the baseline's layout)
        layer.full_elems, layer.itemsize = 2 * B * H_kv * (layer.seen + self.elided) * D, k.element_size()
        if layer_idx == 0:
            self._begin_pass(hf_mask, B, q_len, k.device)
        # each key's position: its slot (dense, unpadded: 0 .. T - 1), through the padding record if any
        if self._slot_pos is None:  # no padding: a slot is a position (-1 stays a hole)
            positions = slots if slots is not None else torch.arange(T, device=k.device).expand(B, H_kv, T)
        else:
            s = slots if slots is not None else torch.arange(T, device=k.device).expand(B, H_kv, T)
            positions = torch.where(s >= 0, torch.gather(self._slot_pos[:, None, :].expand(B, H_kv, -1), 2,
                                                         s.clamp(min=0)), -1)
        step = Step(queries=query, keys=k, values=v, positions=positions, q_positions=self._q_positions,
                    scaling=scaling, compress=self.compress_next, layer_idx=layer_idx,
                    since_compress=self.since_compress)
        selected = layer.store.select(step)
        if selected is not None:  # a retrieval method reads a subset of what it holds
            step._mask = step.mask & selected
        step.bias = layer.store.logit_bias()
        # no mask where it would allow everything anyway: every key in order (causal by shape), or one query
        # over held keys without holes (decoding after uniform eviction); both without padding
        dense = selected is None and step.bias is None and self._slot_pos is None and (
            slots is None or (q_len == 1 and bool((slots >= 0).all())))
        step.all_visible = dense and q_len == 1  # one query that sees every held key: no mask to build or apply
        # a real query that sees at least itself needs no guard against an all-masked row (`_attention_mask`)
        mask = None if dense else step.mask if q_len == 1 and selected is None and step.bias is None else \
            _attention_mask(step)
        out = _sdpa(query, k, v, mask, scaling)  # (B, q, H, D)
        out = layer.store.mix(step, out.transpose(1, 2)).transpose(1, 2)  # a view both ways when unchanged
        layer.store.after_attention(step)
        if layer_idx == self.num_layers - 1 and self.compress_next:
            self.compress_next = False
            self.compressed_at = layer.seen
        return out

    def _extend_padding(self, hf_mask: Optional[Tensor], B: int, q_len: int, seen: int, device) -> None:
        if hf_mask is None or hf_mask.dtype != torch.bool:
            new = None
        else:  # the last query is a real token under left padding; its row tells which new keys are real
            new = hf_mask[:, 0, -1, -q_len:].expand(B, q_len)
            new = None if bool(new.all()) and self.pad_valid is None else new
        if new is None and self.pad_valid is None:
            return  # no padding so far: nothing to record
        if new is None:
            new = torch.ones(B, q_len, dtype=torch.bool, device=device)
        if self.pad_valid is None:
            self.pad_valid = torch.ones(B, seen - q_len, dtype=torch.bool, device=device)
        self.pad_valid = torch.cat([self.pad_valid, new], dim=1)

    def _extend_ids(self, ids: Optional[Tensor], B: int, q_len: int) -> None:
        _active.ids = None  # consumed: a later pass fed embeddings must not reuse these
        if ids is None or tuple(ids.shape) != (B, q_len):
            self._ids_known, self.token_ids = False, None  # fed embeddings: ids unknown from here on
        elif self._ids_known:
            ids = ids.long()
            self.token_ids = ids if self.token_ids is None else torch.cat([self.token_ids, ids], dim=1)


def model_info(model, tokenizer=None) -> Model:
    """What a method may know about `model` (see `base.Model`), without a cache: its rotary embedding, projection
    weights, calibration prefills, token log-probabilities and traces. `KVCache` adds the token ids and the stores."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)  # Llama/Qwen/Mistral-style RoPE module
    layers = getattr(decoder, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None

    def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
        """The model's (cos, sin) for positions (B, T), fp32, (B, T, D): what its attention layers applied."""
        return rotary(torch.empty(0, dtype=torch.float32, device=positions.device), positions)

    def weights(layer_idx: int) -> dict[str, Tensor]:
        a = layers[layer_idx].self_attn
        return {n: getattr(a, f"{n}_proj").weight.detach() for n in ("q", "k", "v", "o")}

    def calibration(text: str = "stdlib", tokens: int = 1024) -> list[Step]:
        from reference_impls.calibration import calibration_steps

        return calibration_steps(model, tokenizer, text, tokens)

    @torch.no_grad()
    def logprobs(ids: Tensor) -> Tensor:
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1).cpu()

    def trace(ids: Tensor) -> list[Step]:
        """One dense Step per layer of an uncompressed prefill of `ids` (1, T), with each layer's `hidden`."""
        if not (isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and not ids.is_floating_point()):
            raise ValueError(f"trace takes token ids of shape (1, T), got {getattr(ids, 'shape', ids)!r}")
        ids = ids.cpu()
        last = _TRACES.setdefault(model, {})  # per model, so the caches of many methods or ratios share it
        if not (last and torch.equal(last["ids"], ids)):  # memoised: every layer's store asks for the same ids
            last.clear()
            last.update(ids=ids, steps=_trace_steps(model, layers, ids))
        return last["steps"]

    has_proj = attn is not None and all(hasattr(attn, f"{n}_proj") for n in ("q", "k", "v", "o"))
    return Model(num_layers=config.num_hidden_layers, rope=rope if rotary is not None else None,
                 tokenizer=tokenizer, weights=weights if has_proj else None, calibration=calibration,
                 logprobs=logprobs, trace=trace)


@torch.no_grad()
def _trace_steps(model, layers, ids: Tensor) -> list[Step]:
    """`record_prefill` of `ids`, plus each decoder layer's input and attention output (forward hooks; a decoder
    layer whose attention module is not `self_attn`, or a model whose layers we cannot find, gives hidden=None)."""
    from reference_impls.replay import record_prefill

    seen: dict = {}
    hooks = []
    for i, layer in enumerate(layers if layers is not None else []):
        if getattr(layer, "self_attn", None) is None:
            continue

        def take_input(module, args, kwargs, i=i):
            seen[i, "x"] = args[0] if args else kwargs["hidden_states"]

        def take_output(module, args, kwargs, out, i=i):
            seen[i, "a"] = out[0] if isinstance(out, tuple) else out

        hooks.append(layer.register_forward_pre_hook(take_input, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(take_output, with_kwargs=True))
    try:
        rec = record_prefill(model, ids)
    finally:
        for h in hooks:
            h.remove()
    steps = []
    for i, (q, k, v) in enumerate(zip(rec.queries, rec.keys, rec.values)):
        steps.append(Step.dense(q, k, v, scaling=rec.scaling, layer_idx=i))
        if (i, "a") in seen:
            steps[-1].hidden = (seen[i, "x"], seen[i, "a"])
    return steps


def _attention_mask(step: Step) -> Tensor:
    """The mask attention uses: the step's, except that a padding query (which sees nothing in `step.mask`) sees
    every key instead of producing NaN (its output is never used); with a logit bias, an additive float mask."""
    mask = step.mask
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    if step.bias is None:
        return mask
    # additive float mask: the keys' logit bias where visible, -inf elsewhere
    bias = step.bias.to(step.queries.dtype)[:, :, None, :]
    return torch.where(mask, bias, torch.finfo(step.queries.dtype).min)


def _record_ids(module, args, kwargs):
    """Pre-hook on the input embedding: the ids of the pass now running, for `Step.token_ids`."""
    ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
    _active.ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scaling: float) -> Tensor:
    """Attention over (B, H_kv, T, D) keys for (B, H, q, D) queries -> (B, q, H, D), without copying keys per
    query head: one query (decoding) attends as a G-query block per KV head, as transformers' `pack_gqa` does;
    a dense prompt uses SDPA's own GQA. mask (B, H_kv or 1, q, T) bool or None (causal by shape)."""
    B, H, q_len, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    G = H // H_kv
    if mask is None and q_len in (1, T):  # every key visible (one query) or causal by shape: SDPA's own GQA
        out = F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scaling, enable_gqa=G > 1)
        return out.transpose(1, 2).contiguous()
    if q_len == 1:  # masked (holes, padding): the G heads of a group are G queries of one KV head
        out = F.scaled_dot_product_attention(q.view(B, H_kv, G, D), k, v, attn_mask=mask, scale=scaling)
        return out.view(B, 1, H, D)
    if mask is None:  # a later chunk of a dense cache: causal with an offset
        mask = torch.ones(q_len, T, dtype=torch.bool, device=q.device).tril(T - q_len)[None, None]
    mask = repeat_kv(mask, G)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, G), repeat_kv(v, G), attn_mask=mask, scale=scaling)
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


