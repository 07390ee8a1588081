"""ZipCache: salient tokens (high normalized attention) keep more bits; values use channel-separable quantization.

Paper: He, Zhang, Wu, Liu, Zhou, Zhuang, "ZipCache: Accurate and Efficient KV Cache Quantization with Salient
Token Identification", arXiv 2405.14256 (NeurIPS 2024): the normalized attention score (a token's accumulated
attention divided by the number of queries that can see it, so early tokens are not favoured by the causal
mask), mixed precision (salient tokens at high bits, the rest at low bits), channel-separable tokenwise
quantization (channels divided by sqrt(max |x|), then one min-max range per token), probe tokens.
Official code: https://github.com/ThisisBillhe/ZipCache (`zipcache/models/modeling_llama.py`,
`zipcache/models/CompressUtils/compress_function.py`)
Deviations: (1) the saliency uses every query of the compressing pass (the exact metric), not the probe
tokens (5% recent + 5% random queries) the paper uses to stay compatible with FlashAttention. (2) Ranges
per KV head: keys per (head, channel) over the set's tokens, values per (head, token) over D (the official
code spans all heads). (3) Every row keeps round(salient_ratio T) salient tokens per head, padding counted
in T and never salient. (4) Decoding blocks of `streaming_gap` tokens are scored with the attention of the
step that completes them, as the official code does, normalized by the queries of that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from reference_impls.quantization.primitives import QuantizedTensor, pack, unpack
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec, closest
from reference_impls.quantization.store import Quantizer

__all__ = ["ZipCache", "normalized_attention", "zipcache_quantize", "zipcache_dequantize"]


def normalized_attention(probs: Tensor, seen_by: Tensor, groups: int) -> Tensor:
    """probs (B, H, q, T), seen_by (B, H_kv, T) queries that may attend each key -> (B, H_kv, T) scores.

    Column sums over the step's queries and the G query heads of a KV head (summed, as the official code),
    divided by how many queries see the token.
    """
    B, H, q, T = probs.shape
    return probs.float().reshape(B, H // groups, groups, q, T).sum((2, 3)) / seen_by.clamp(min=1)


def zipcache_quantize(k: Tensor, v: Tensor, salient: Tensor, *, high_bits: int, low_bits: int) -> dict:
    """Mixed-precision block: salient tokens (B, H_kv, T) bool at high_bits, the others at low_bits.

    Keys: per channel over each set's tokens. Values: channels divided by c = sqrt(max_t |v|), then one range
    per token. Every head has the same number of salient tokens.
    """
    B, H, T, D = k.shape
    order = torch.argsort((~salient).to(torch.uint8), dim=-1, stable=True)  # salient first, in time order
    n = int(salient[0, 0].sum())
    c = v.float().abs().amax(2, keepdim=True).sqrt().clamp(min=1e-6)  # (B, H, 1, D) channel scale
    vn = (v.float() / c).to(v.dtype)
    out = {"mask": pack(salient.to(torch.uint8), 1), "c": c.to(v.dtype)}
    for tag, idx, bits in (("high", order[..., :n], high_bits), ("low", order[..., n:], low_bits)):
        if idx.shape[-1]:
            g = idx[..., None].expand(-1, -1, -1, D)
            out["k_" + tag] = QuantizedTensor.from_float(k.gather(2, g), bits=bits, dim=2, group_size=idx.shape[-1])
            out["v_" + tag] = QuantizedTensor.from_float(vn.gather(2, g), bits=bits, dim=3, group_size=D)
    return out


def zipcache_dequantize(block: dict, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The block's keys and values (B, H_kv, T, D), each token from its own set."""
    salient = unpack(block["mask"], 1, T).bool()
    order = torch.argsort((~salient).to(torch.uint8), dim=-1, stable=True)
    parts_k = [block[t].dequantize() for t in ("k_high", "k_low") if t in block]
    parts_v = [block[t].dequantize() for t in ("v_high", "v_low") if t in block]
    g = order[..., None].expand(-1, -1, -1, parts_k[0].shape[-1])
    k = torch.empty(g.shape, device=g.device).scatter_(2, g, torch.cat(parts_k, 2))
    v = torch.empty(g.shape, device=g.device).scatter_(2, g, torch.cat(parts_v, 2)) * block["c"].float()
    return k.to(dtype), v.to(dtype)


@dataclass
class ZipCache(Quantizer):
    """A fraction `salient_ratio` of tokens (by normalized attention) at `high_bits`, the rest at `low_bits`.

    Args:
        salient_ratio: fraction of each head's tokens kept at high precision, in [0, 1] (official demo: 0.6).
        high_bits, low_bits: 1, 2, 4 or 8, high >= low (official: 4 and 2).
        streaming_gap: decoded tokens gathered in full precision before they are quantized (official: 100).
    """

    salient_ratio: float = 0.6
    high_bits: int = 4
    low_bits: int = 2
    streaming_gap: int = 100


    def __post_init__(self):
        if not (isinstance(self.salient_ratio, (int, float)) and 0 <= self.salient_ratio <= 1):
            raise ValueError(f"ZipCache: salient_ratio must be in [0, 1], got {self.salient_ratio!r}")
        for f in ("high_bits", "low_bits"):
            if getattr(self, f) not in (1, 2, 4, 8):
                raise ValueError(f"ZipCache: {f} must be one of 1, 2, 4, 8, got {getattr(self, f)!r}")
        if self.high_bits < self.low_bits:
            raise ValueError(f"ZipCache: high_bits must be >= low_bits ({self.low_bits}), got {self.high_bits!r}")
        if not (isinstance(self.streaming_gap, int) and self.streaming_gap >= 1):
            raise ValueError(f"ZipCache: streaming_gap must be an int >= 1, got {self.streaming_gap!r}")

    def flush(self, held_k, held_v, buffered, step):
        # the prompt is compressed at once, then every streaming_gap new tokens
        n = buffered if step.compress or (held_k and buffered >= self.streaming_gap) else 0
        return n, n

    def encode(self, k, v, step, state) -> dict:
        n = k.shape[2]  # the step's newest n keys
        groups = step.queries.shape[1] // step.keys.shape[1]
        score = normalized_attention(step.probs(), step.mask.sum(2), groups)[..., -n:]
        score = score.masked_fill(~step.valid[..., -n:], float("-inf"))  # padding is never salient
        top = score.topk(round(self.salient_ratio * n), dim=-1).indices
        salient = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return {"n": n, **zipcache_quantize(k, v, salient, high_bits=self.high_bits, low_bits=self.low_bits)}

    def decode(self, block, dtype, state):
        return zipcache_dequantize(block, block["n"], dtype)

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after T prompt tokens (one block): packed codes of each set, key ranges per
        channel and set and value ranges per token (in the cache's dtype), the channel scales c and the 1-bit
        salient mask."""
        T, D, cb = cache.tokens, cache.head_dim, cache.bits
        n = round(self.salient_ratio * T)
        held = 2 * (n * 8 * math.ceil(D * self.high_bits / 8) + (T - n) * 8 * math.ceil(D * self.low_bits / 8))
        held += sum(2 * D * cb for m in (n, T - n) if m) + 2 * T * cb + D * cb + 8 * math.ceil(T / 8)
        return cache.full_bits() / held

    @classmethod
    def from_ratio(cls, ratio: float, /, cache: CacheSpec = EMBEDDED, **knobs) -> "ZipCache":
        """The bit pair (8/4, 4/2 or 2/1, the official 2:1 widths) and salient ratio whose nominal ratio on
        `cache` is nearest `ratio`; within a pair the salient ratio moves the bytes linearly, so it is solved for.

        On the benchmark's 16-bit cache 8/4 spans 1.9x (all salient) to 3.7x, 4/2 3.7x to 7.0x, 2/1 7.0x to
        12.6x: targets 2 -> 8/4 with 93% salient, 4 -> 4/2 with 86%, 8 -> 2/1 with 72% (the official 4/2 with
        60% salient: 4.6x). On fp32 every span doubles: 2 -> all 8-bit (3.7x, the nearest), 4 -> 8/4, 8 -> 4/2.
        """
        candidates = []
        for high, low in ((8, 4), (4, 2), (2, 1)):
            # bits held at s = 1/4 and 3/4 (both sets present, so both carry key ranges): a line in s
            a, b = (cache.full_bits() / cls(salient_ratio=s, high_bits=high, low_bits=low).nominal_ratio(cache)
                    for s in (0.25, 0.75))
            target = cache.full_bits() / ratio if isinstance(ratio, (int, float)) and ratio > 0 else a
            s = min(max(0.25 + 0.5 * (target - a) / (b - a), 0.0), 1.0)
            candidates.append(cls(**{"salient_ratio": s, "high_bits": high, "low_bits": low, **knobs}))
        return closest(ratio, candidates, cache, "ZipCache")
