"""Multi-head latent attention: cache one small latent c per token (plus one RoPE key), not per-head keys/values.

Paper: DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model",
arXiv 2405.04434, Section 2.1.2 (low-rank key-value joint compression, Eq. 9-11), Section 2.1.3 (decoupled
RoPE, Eq. 14-19: softmax scale 1/sqrt(d_h + d_h^R)), Table 1 (cache per token (d_c + d_h^R) l), Section 3.1.2
(d_c = 4 d_h, d_h^R = d_h / 2; an RMSNorm after the latent).
Official code: https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/model.py (class MLA, its
"naive" and "absorb" paths; DeepSeek-V2 ships its modeling code on the Hugging Face hub).

Two forms read the same cache and are tested equal:
  naive     up-project K = W^UK c, V = W^UV c for every held token, then attend per head (Eq. 17-18);
  absorbed  fold W^UK into the query (q~_i = W^UK_i^T W^Q_i h) and W^UV into the output (W^O_i W^UV_i), so the
            heads attend to the latent itself: MQA with one key head [c; k^R] and one value head c.
Deviations: (1) no low-rank query compression (Eq. 12-13; DeepSeek-V2-Lite omits it too); (2) d_c and d_h^R
default to the paper's ratios to d_h (4 d_h, d_h / 2), not its sizes.

Cache per layer: c (B, 1, T, d_c) and k^R (B, 1, T, d_h^R).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from reference_impls.base import UNIT_BYTES
from reference_impls.architectures.common import ArchConfig, Mixer, MixerCache, rope
from reference_impls.architectures.mha import attention

__all__ = ["MLA", "bytes_per_token", "cache_bytes", "make"]


class MLA(Mixer):
    """H heads of dim D reading a cached latent c (d_latent) and a shared RoPE key k^R (rope_dim)."""

    def __init__(self, cfg: ArchConfig, d_latent: Optional[int] = None, rope_dim: Optional[int] = None,
                 absorbed: bool = False):
        super().__init__()
        H, D = cfg.n_heads, cfg.head_dim
        self.d_latent, self.rope_dim = d_latent or 4 * D, rope_dim or D // 2
        if self.d_latent < 1:
            raise ValueError(f"d_latent must be >= 1, got {self.d_latent}")
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise ValueError(f"rope_dim must be even and >= 2 (RoPE rotates pairs), got {self.rope_dim}")
        self.n_heads, self.head_dim, self.base, self.absorbed = H, D, cfg.rope_base, absorbed
        C, R = self.d_latent, self.rope_dim
        self.wq = nn.Linear(cfg.d_model, H * D, bias=False)    # W^Q: content part of the queries
        self.wqr = nn.Linear(cfg.d_model, H * R, bias=False)   # W^QR: per-head RoPE queries
        self.wdkv = nn.Linear(cfg.d_model, C, bias=False)      # W^DKV: down-projection to the latent
        self.kv_norm = nn.RMSNorm(C, eps=1e-6)                 # Section 3.1.2: RMSNorm after the latent
        self.wkr = nn.Linear(cfg.d_model, R, bias=False)       # W^KR: one RoPE key shared by all heads
        self.wuk = nn.Linear(C, H * D, bias=False)             # W^UK, W^UV: up-projections of the latent
        self.wuv = nn.Linear(C, H * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.d_model, bias=False)

    def heads(self, x: Tensor, dim: int) -> Tensor:
        """(B, T, H * dim) -> (B, H, T, dim)."""
        return x.view(x.shape[0], x.shape[1], self.n_heads, dim).transpose(1, 2)

    def forward(self, x: Tensor, cache: Optional[MixerCache] = None, shared=None) -> Tensor:
        B, T, _ = x.shape
        start = 0 if cache is None else cache.seen
        pos = torch.arange(start, start + T, device=x.device)
        c = self.kv_norm(self.wdkv(x))[:, None]                        # (B, 1, T, d_c)
        kr = rope(self.wkr(x)[:, None], pos, self.base)                 # (B, 1, T, R)
        qr = rope(self.heads(self.wqr(x), self.rope_dim), pos, self.base)  # (B, H, T, R)
        if cache is not None:  # all that is held: the latent and the RoPE key
            c, kr = cache.append("c", c), cache.append("kr", kr)
            cache.seen += T
        k_pos = torch.arange(c.shape[2], device=x.device)
        scale = 1 / math.sqrt(self.head_dim + self.rope_dim)  # Eq. 18
        return (self.absorbed_form if self.absorbed else self.naive_form)(x, c, kr, qr, pos, k_pos, scale)

    def naive_form(self, x, c, kr, qr, pos, k_pos, scale):
        """Eq. 10-11, 16-19: per-head keys [W^UK c; k^R] and values W^UV c rebuilt for every held token."""
        H, T = self.n_heads, c.shape[2]
        q = torch.cat([self.heads(self.wq(x), self.head_dim), qr], dim=-1)      # (B, H, q, D + R)
        k = torch.cat([self.heads(self.wuk(c[:, 0]), self.head_dim), kr.expand(-1, H, T, -1)], dim=-1)
        v = self.heads(self.wuv(c[:, 0]), self.head_dim)                         # (B, H, T, D)
        o = attention(q, k, v, pos, k_pos, scale=scale)                          # (B, H, q, D)
        return self.wo(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """W^UK_i^T W^Q_i (H, d_c, d_model) and W^O_i W^UV_i (H, d_model, d_c): the up-projections folded away."""
        H, D, C = self.n_heads, self.head_dim, self.d_latent
        wuk, wuv = self.wuk.weight.view(H, D, C), self.wuv.weight.view(H, D, C)
        q_abs = torch.einsum("hdc,hdm->hcm", wuk, self.wq.weight.view(H, D, -1))
        o_abs = torch.einsum("mhd,hdc->hmc", self.wo.weight.view(-1, H, D), wuv)
        return q_abs, o_abs

    def absorbed_form(self, x, c, kr, qr, pos, k_pos, scale):
        """Same scores and output as the naive form, reading the latent directly: MQA with key [c; k^R], value c."""
        q_abs, o_abs = self.absorbed_weights()
        q = torch.cat([torch.einsum("btm,hcm->bhtc", x, q_abs), qr], dim=-1)    # (B, H, q, d_c + R)
        a = attention(q, torch.cat([c, kr], dim=-1), c, pos, k_pos, scale=scale)  # (B, H, q, d_c)
        return torch.einsum("bhtc,hmc->btm", a, o_abs)


def make(cfg: ArchConfig, d_latent: Optional[int] = None, rope_dim: Optional[int] = None,
         absorbed: bool = False) -> list[Mixer]:
    return [MLA(cfg, d_latent, rope_dim, absorbed) for _ in range(cfg.n_layers)]


def bytes_per_token(cfg: ArchConfig, dtype_bytes: int = UNIT_BYTES, d_latent: Optional[int] = None,
                    rope_dim: Optional[int] = None) -> int:
    """Table 1: (d_c + d_h^R) * n_layers elements per token, whatever the number of heads."""
    return cfg.n_layers * ((d_latent or 4 * cfg.head_dim) + (rope_dim or cfg.head_dim // 2)) * dtype_bytes


def cache_bytes(cfg: ArchConfig, seq_len: int, dtype_bytes: int = UNIT_BYTES, d_latent: Optional[int] = None,
                rope_dim: Optional[int] = None) -> int:
    return seq_len * bytes_per_token(cfg, dtype_bytes, d_latent, rope_dim)
