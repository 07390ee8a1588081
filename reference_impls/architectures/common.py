"""What every architecture shares: the config, the mixer and cache contracts, the tiny LM around them, `build`.

A `Mixer` is one sequence-mixing layer (attention, a recurrence). `TinyLM` wraps a list of them, one per layer,
in the same pre-norm block (RMSNorm -> mixer -> RMSNorm -> SwiGLU MLP), so architectures differ only in the
mixer. Two ways to run it, tested equal for every architecture:

    logits = lm(ids)                                    # parallel over the whole sequence (training)
    caches = lm.new_caches(B); lm.step(ids[:, t:t+1], caches) for each t   # incremental (decoding)

A `MixerCache` holds a layer's tensors between steps; `TinyLM.cache_nbytes` sums them with
`reference_impls.base.nbytes`, as every other method's memory is counted.

Cross-layer sharing (CLA, YOCO): a mixer whose `exports` is True returns `(y, export)`; every later layer gets
the latest export as `shared` until another layer exports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.base import nbytes

__all__ = ["ARCHS", "ArchConfig", "Mixer", "MixerCache", "SwiGLU", "TinyLM", "build", "rope"]


@dataclass
class ArchConfig:
    """One config for every architecture; latent and state sizes are knobs of each module's `make`."""

    vocab: int = 64
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 16
    n_kv_heads: int = 4      # MQA 1, GQA 2, MHA = n_heads
    d_ff: int = 128          # MLP width; the trainer adjusts it to match the parameter budget
    window: int = 32         # local attention window (hybrid, YOCO's self-decoder)
    rope_base: float = 10000.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "rope_base" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f.name} must be a positive int, got {v!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")


def rope(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary position embedding (Su et al., arXiv 2104.09864), rotate-half layout as in Llama.

    x (B, H, T, D) with D even, pos (T,) int -> (B, H, T, D): channel i pairs with channel i + D/2.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angle = pos.to(torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class MixerCache:
    """One layer's decode state: named tensors (`held`, what `nbytes` counts) and the tokens seen so far."""

    held: dict = field(default_factory=dict)
    seen: int = 0

    def nbytes(self) -> int:
        return nbytes(self.held)

    def append(self, name: str, x: Tensor, keep: Optional[int] = None) -> Tensor:
        """Concatenate x (B, H, T, D) after held[name] along time; hold only the last `keep` entries.

        Returns the whole concatenation (before trimming): the new queries may read all of it.
        """
        old = self.held.get(name)
        full = x if old is None else torch.cat([old, x], dim=-2)
        self.held[name] = full if keep is None else full[..., -keep:, :].clone()  # clone: free the rest
        return full


class Mixer(nn.Module):
    """One sequence-mixing layer, x (B, T, d_model) -> (B, T, d_model).

    forward(x, cache=None, shared=None): cache None -> the parallel form over the whole sequence; a cache ->
    the T new tokens continue the sequence it holds, and it is updated in place. `shared` is the latest
    export of a lower layer (CLA, YOCO), else None. A mixer with `exports = True` returns (y, export).
    """

    exports: bool = False

    def forward(self, x: Tensor, cache: Optional[MixerCache] = None, shared=None):
        raise NotImplementedError

    def new_cache(self, batch: int) -> MixerCache:
        return MixerCache()


class SwiGLU(nn.Module):
    """The MLP of Llama-style blocks: W2 (silu(W1 x) * W3 x) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TinyLM(nn.Module):
    """embedding -> n_layers x [RMSNorm, mixer, RMSNorm, SwiGLU] (pre-norm, residual) -> RMSNorm -> tied head."""

    def __init__(self, cfg: ArchConfig, mixers: list[Mixer]):
        super().__init__()
        if len(mixers) != cfg.n_layers:
            raise ValueError(f"mixers must have n_layers={cfg.n_layers} entries, got {len(mixers)}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the head: small logits at initialisation
        self.mixers = nn.ModuleList(mixers)
        self.norms1 = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=1e-6) for _ in mixers)
        self.norms2 = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=1e-6) for _ in mixers)
        self.mlps = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_ff) for _ in mixers)
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)

    def _run(self, ids: Tensor, caches: Optional[list]) -> Tensor:
        h, shared = self.embed(ids), None  # (B, T, d_model)
        for i, mixer in enumerate(self.mixers):
            out = mixer(self.norms1[i](h), None if caches is None else caches[i], shared)
            if mixer.exports:
                out, shared = out
            h = h + out
            h = h + self.mlps[i](self.norms2[i](h))
        return self.norm(h) @ self.embed.weight.T  # (B, T, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> logits (B, T, vocab), the parallel form."""
        return self._run(ids, None)

    def new_caches(self, batch: int) -> list[MixerCache]:
        return [m.new_cache(batch) for m in self.mixers]

    def step(self, ids: Tensor, caches: list[MixerCache]) -> Tensor:
        """ids (B, T) continuing the sequence in `caches` (updated in place) -> logits (B, T, vocab)."""
        return self._run(ids, caches)

    def cache_nbytes(self, caches: list[MixerCache]) -> int:
        return nbytes(*caches)


#: name -> module of reference_impls.architectures whose `make(cfg)` returns the mixers, one per layer
ARCHS = {"mha": "mha", "mqa": "mqa", "gqa": "gqa", "mla": "mla", "cla": "cla", "yoco": "yoco",
         "linear": "linear", "mamba": "mamba", "griffin": "griffin"}


def build(arch: str, cfg: ArchConfig) -> TinyLM:
    """A TinyLM whose mixers are architecture `arch` (a key of ARCHS); the module is imported only now."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    name = f"reference_impls.architectures.{ARCHS[arch]}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ModuleNotFoundError(f"architecture {arch!r}: module {name} is not there yet", name=name) from e
    return TinyLM(cfg, module.make(cfg))
