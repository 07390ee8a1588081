"""MiniCache: from the middle depth on, two adjacent layers share one direction per token and keep their own lengths.

Paper: Liu, Liu, Pan, He, Haffari, Zhuang, "MiniCache: KV Cache Compression in Depth Dimension for Large Language
Models", arXiv 2405.14366 (NeurIPS 2024), Section 4.1 and Figure 3: each state x splits into its magnitude ||x||
and its direction x / ||x||; the pair of layers (l-1, l) stores one SLERP of the two directions (Eq. 3,
interpolation t) and both layers' magnitudes, and restores x ~ ||x|| e (Eq. 2); token pairs whose angular
distance d = Omega / pi is large are retained unmerged (retention threshold gamma). Presets from the paper's
experiments: merging starts at the middle layer S = L/2, t = 0.6, gamma = 0.05. Its headline setting (5.02x) runs
MiniCache on a 4-bit KIVI cache.
Official code: none public (github.com/AkideLiu/MiniCache holds the project page only).
Deviations: (1) Only what the cache holds at the compressing pass (the prompt) is merged; tokens decoded later stay
unmerged in each layer (the paper's Figure 4 merges them too, after each decoding step's attention). (2) The
retention inequality could not be read from a text copy of the paper here. We retain a token pair (per KV head,
keys and values apart) when its distance lies in the top gamma of its row's range, d >= d_min + (1 - gamma)
(d_max - d_min): more gamma retains more, as the paper's ablation reports; gamma = 1 retains every pair, gamma = 0 none.
(3) Retained tokens are held beside the merged directions (their slot's direction is overwritten on restore), with
one int32 index per retained pair; magnitudes and retained vectors stay in the model's dtype. (4) `bits` < 16 holds
the unmerged layers, the shared directions and the decoded tokens the KIVI way (per-channel keys, per-token values,
groups of 32, the 128 newest tokens in full precision), our reading of "MiniCache on 4-bit KIVI".

Counting: the pair's second layer (l) holds the shared directions and the retained indices, counted once; each
layer holds its own magnitudes and retained vectors. `from_ratio` keeps S = L/2 and picks the precision (16, 8, 4
or 2 bits) nearest the target; below ~1.3x it starts merging deeper, beyond 2 bits' ~5.2x shallower (the paper
varies S in Figure 1(b)). Without quantization MiniCache cannot reach 2x (at most ~1.94x, S = 0, head dim 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, LayerStore, Model, Step, nbytes
from reference_impls.quantization.kivi import KIVI, kivi_quantize
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec, closest

__all__ = ["MiniCache", "minicache_merge", "minicache_restore", "slerp"]

BITS = (16, 8, 4, 2)  # 16: the model's dtype; else KIVI-b
EMBEDDED_LAYERS = 30  # SmolLM2-135M, the benchmark's model: nominal ratios count its pairs


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Eq. (3): spherical interpolation of unit vectors a (layer l-1) and b (layer l), (..., D); t=0 -> a, 1 -> b."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    s = torch.sin(omega)
    flat = s < 1e-6  # (anti)parallel: the limit of the formula, the straight line, renormalised below
    wa = torch.where(flat, 1.0 - t, torch.sin((1 - t) * omega) / s.clamp(min=1e-6))
    wb = torch.where(flat, float(t), torch.sin(t * omega) / s.clamp(min=1e-6))
    e = wa * a + wb * b
    return e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # a no-op for true SLERP: it stays on the sphere


def minicache_merge(x_prev: Tensor, x: Tensor, *, t: float, gamma: float):
    """One pair's states (B, H_kv, T, D) of layers l-1 and l -> (shared direction (B, H_kv, T, D) fp32, magnitudes of
    l-1 and of l (B, H_kv, T) fp32, retained (B, H_kv, T) bool: pairs too far apart to merge, Deviation 2)."""
    xp, xl = x_prev.float(), x.float()
    mp, ml = xp.norm(dim=-1), xl.norm(dim=-1)
    up, ul = xp / mp.clamp(min=1e-12)[..., None], xl / ml.clamp(min=1e-12)[..., None]
    d = torch.arccos((up * ul).sum(-1).clamp(-1.0, 1.0)) / math.pi  # angular distance in [0, 1]
    dmax, dmin = d.amax(-1, keepdim=True), d.amin(-1, keepdim=True)
    retained = d >= dmin + (1 - gamma) * (dmax - dmin) if gamma > 0 else torch.zeros_like(d, dtype=torch.bool)
    return slerp(up, ul, t), mp, ml, retained


def minicache_restore(direction: Tensor, magnitude: Tensor, idx: Tensor, vectors: Tensor) -> Tensor:
    """Eq. (2) then retention recovery: ||x|| e (B, H_kv, T, D), with `vectors` (N, D) put back at the flat
    (B * H_kv * T) token indices `idx` (N,)."""
    x = direction * magnitude[..., None].to(direction.dtype)
    x.view(-1, x.shape[-1])[idx.long()] = vectors
    return x


def _directions(shared, dtype) -> tuple[Tensor, Tensor]:
    kq, kf, vq, vf = shared  # kivi_quantize's layout: quantized part (or None), full-precision part
    return tuple(f if q is None else torch.cat([q.dequantize(dtype), f], 2) for q, f in ((kq, kf), (vq, vf)))


class PairStore(LayerStore):
    """Layer l-1 ("first") or l ("second") of a merged pair. Each holds its magnitudes, its retained vectors and its
    tokens not merged (`tail`: all of them before the compressing pass, the decoded ones after); the second also
    holds the pair's shared directions and retained indices (counted once)."""

    def __init__(self, method: "MiniCache", model: Model, layer_idx: int, partner: int):
        self.method, self.model, self.layer_idx, self.partner = method, model, layer_idx, partner
        self.second = layer_idx > partner
        self.tail = method.plain_store(layer_idx, model)
        self.mag = self.vec = self.shared = self.idx = None  # set when the pair merges
        self.merged = False

    def restored(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        second = self if self.second else self.model.stores[self.partner]
        dirs = _directions(second.shared, dtype)
        return tuple(minicache_restore(d, m, i, x) for d, m, i, x in zip(dirs, self.mag, second.idx, self.vec))

    def append(self, k: Tensor, v: Tensor):
        kk, vv, _ = self.tail.append(k, v)
        if not self.merged:
            return kk, vv, None
        pk, pv = self.restored(k.dtype)
        return torch.cat([pk, kk], dim=2), torch.cat([pv, vv], dim=2), None

    def after_attention(self, step: Step) -> None:
        if step.compress and not self.merged:
            if self.second:  # layer l-1 already attended: merge both now (a replay calls the layers in order too)
                self.merge(self.model.stores[self.partner])
            return  # layer l-1 waits for layer l, its tail kept in full precision until then
        self.tail.after_attention(step)

    def merge(self, first: "PairStore") -> None:
        m, dtype = self.method, self.tail.k.dtype
        ek, mk1, mk2, rk = minicache_merge(first.tail.k, self.tail.k, t=m.t, gamma=m.gamma)
        ev, mv1, mv2, rv = minicache_merge(first.tail.v, self.tail.v, t=m.t, gamma=m.gamma)
        self.idx = tuple(r.flatten().nonzero()[:, 0].to(torch.int32) for r in (rk, rv))
        for store, mags in ((first, (mk1, mv1)), (self, (mk2, mv2))):
            held = (store.tail.k, store.tail.v)
            store.mag = tuple(x.to(dtype) for x in mags)
            store.vec = tuple(x.reshape(-1, x.shape[-1])[i.long()] for x, i in zip(held, self.idx))
            store.tail = m.plain_store(store.layer_idx, store.model, started=True)  # decoded tokens from here on
            store.merged = True
        ek, ev = ek.to(dtype), ev.to(dtype)
        self.shared = ((None, ek, None, ev) if m.bits == 16 else
                       kivi_quantize(ek, ev, bits=m.bits, group_size=32, residual_length=128))

    def nbytes(self) -> int:
        return nbytes(self.tail, self.mag, self.vec, self.shared, self.idx)


@dataclass
class MiniCache(KVMethod):
    """Merge layer pairs (S, S+1), (S+2, S+3) ... with S = floor(start * L) into one direction + magnitudes per token.

    Args:
        start: where merging starts, as a fraction of depth (paper: 1/2); 1 merges nothing.
        t: SLERP interpolation, 0 = layer l-1's direction, 1 = layer l's (paper: 0.6).
        gamma: retention threshold in [0, 1], the top fraction of each row's distance range kept unmerged (paper: 0.05).
        bits: 16 (the model's dtype) or 8, 4, 2: what the cache holds stored as KIVI-b (paper: MiniCache on KIVI-4).
    """

    start: float = 0.5
    t: float = 0.6
    gamma: float = 0.05
    bits: int = 16

    def __post_init__(self):
        for knob in ("start", "t", "gamma"):
            value = getattr(self, knob)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"MiniCache: {knob} must be a number in [0, 1], got {value!r}")
        if self.bits not in BITS:
            raise ValueError(f"MiniCache: bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")

    def pairs(self, num_layers: int) -> dict[int, int]:
        """layer -> its partner, for every merged layer."""
        first = math.floor(self.start * num_layers + 1e-9)
        out = {}
        for a in range(first, num_layers - 1, 2):
            out[a], out[a + 1] = a + 1, a
        return out

    def plain_store(self, layer_idx: int, model: Model, started: bool = False) -> LayerStore:
        """What holds unmerged tokens: the model's dtype, or a KIVI store (already past its compressing pass)."""
        if self.bits == 16:
            return DenseStore()
        store = KIVI(bits=self.bits).new_layer(layer_idx, model)
        store.started = started
        return store

    def new_layer(self, layer_idx: int, model: Model) -> LayerStore:
        partner = self.pairs(model.num_layers).get(layer_idx)
        return self.plain_store(layer_idx, model) if partner is None else PairStore(self, model, layer_idx, partner)

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED, layers: int = EMBEDDED_LAYERS) -> float:
        """Full bytes / bytes held after T prompt tokens of a `layers`-layer model, retained pairs not counted (their
        number depends on the prompt): unmerged layers at KIVI's ratio, a merged pair one direction + 4 magnitudes."""
        q = 1.0 if self.bits == 16 else KIVI(bits=self.bits).nominal_ratio(cache)
        merged = len(self.pairs(layers))
        return layers / ((layers - merged) / q + merged * (1 / (2 * q) + 1 / cache.head_dim))

    @classmethod
    def from_ratio(cls, ratio: float, /, cache: CacheSpec = EMBEDDED, **knobs) -> "MiniCache":
        """S = L/2 at the precision nearest `ratio`; below 16 bits' ~1.3x a deeper S, beyond the lowest precision's
        reach a shallower S (on the embedded model's 30 layers). Knobs the caller fixed stay fixed."""
        grid = [s / EMBEDDED_LAYERS for s in range(EMBEDDED_LAYERS + 1)]
        bits = [knobs.pop("bits")] if "bits" in knobs else list(BITS)
        if "start" in knobs:
            options = [cls(bits=b, **knobs) for b in bits]
        else:
            options = [cls(start=0.5, bits=b, **knobs) for b in bits]
            options += [cls(start=s, bits=bits[0], **knobs) for s in grid[::-1] if s > 0.5]  # least merging first
            options += [cls(start=s, bits=bits[-1], **knobs) for s in grid[::-1] if s < 0.5]
        return closest(ratio, options, cache, cls.__name__)
