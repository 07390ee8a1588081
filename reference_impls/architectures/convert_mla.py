"""MHA -> MLA conversion of a trained checkpoint, before fine-tuning: partial RoPE, then one joint low-rank latent of
the no-RoPE keys and the values per token, which is what the cache holds (with the kept RoPE key dims).

Paper: Ji, Guo, Wu, Guo, Shen, Chen, Qiu, Zhang, Gui, "Towards Economical Inference: Enabling DeepSeek's Multi-Head
Latent Attention in Any Transformer-based LLMs" (MHA2MLA), arXiv 2502.14837 (ACL 2025): partial RoPE (RoPE kept on
a few frequency pairs of each query/key head, chosen by frequency, S_high / S_low, or by their contribution to the
attention scores, S_2-norm) and SVD_joint (one truncated SVD of the stacked no-RoPE key and value projections; the
latent c_t = x_t W_DKV is cached, W_UK and W_UV rebuild keys and values). Meng et al., "TransMLA: Multi-Head Latent
Attention Is All You Need", arXiv 2502.07864: the latent basis from a PCA of calibration keys and values instead of
the weights, after balancing their norms (BKV). Section and equation numbers not checked (the full texts could not
be read here): facts from the abstracts and the official code.
Official code: https://github.com/JT-Ushio/MHA2MLA (`src/mha2mla/patch_func.py` partial_rope_mask,
svd_low_rank_approx; `src/mha2mla/2_norm.py`), https://github.com/fxmeng/TransMLA (`transmla/transmla/lora_qkv.py`).

Layout (transformers' rotate_half): dim p of a head pairs with dim p + D/2 and turns at frequency base^(-2p/D), p < D/2
(p = 0 the fastest). Partial RoPE keeps n pairs per layer and sets cos = 1, sin = 0 on the others, for queries and
keys alike (`partial_rope`), so those key dims reach the cache unrotated: k_nope = x W_k,nope^T exactly. With
z = [k_nope / s; v] (H_kv (D - 2n) + H_kv D dims) and U_r (N, r) orthonormal:

    c = z U_r   (B, T, r)   held, with k_rope (B, H_kv, T, 2n);    z ~ c U_r^T   rebuilt when attention reads

basis="svd" (MHA2MLA's SVD_joint): U_r from W = [W_k,nope / s; W_v] = U S V^T (nn.Linear's layout), so c = x V_r S_r,
the official down-projection x V_r up to the fixed scale S_r, and z ~ x W_r^T. basis="pca" (TransMLA): U_r the top
eigenvectors of Z^T Z for the converted model's own calibration keys and values. s = 1, or with balance=True the
ratio of the no-RoPE keys' norm to the values' (of the weights for "svd", of the calibration states for "pca").

Deviations: (1) No fine-tuning: the converted model is measured as is (MHA2MLA fine-tunes on 0.6-1% of the
pre-training data, TransMLA on billions of tokens, to recover what the conversion loses). (2) S_2-norm is pooled
over the KV heads of a layer (one set of pairs per layer; the paper ranks pairs per head): transformers' Llama
applies one cos/sin to every head of a layer. (3) Of TransMLA only the PCA latent and BKV: its RoRoPE/FreqFold
(concentrating RoPE into one head) is not done, partial RoPE is MHA2MLA's; the PCA calibrates on 1024 tokens of
standard-library docstrings, not WikiText-2. (4) Queries are not factorised and W_UK is not absorbed into W_q (the
same attention, more compute). (5) A projection bias (Qwen) would be projected with the key; only bias-free Llama
layers are tested.
Bytes: the latent and the RoPE key dims, L (r + 2 n H_kv) per token in the cache's dtype (`bytes_per_token`); the
bases are the converted model's weights (W_UK, W_UV), not cache, and are not counted.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import KVMethod, LayerStore, Model, nbytes
from reference_impls.lowrank.projection import top_basis

__all__ = ["LatentStore", "MLALatent", "bytes_per_token", "frequency_pairs", "mha2mla", "norm_pairs", "partial_rope",
           "pca_basis", "rope_dims", "svd_basis"]


def frequency_pairs(strategy: str, n_pairs: int, head_dim: int, num_layers: int) -> Tensor:
    """(L, n_pairs) frequency pairs that keep RoPE: "high" the fastest (S_high), "low" the slowest (S_low)."""
    if strategy not in ("high", "low"):
        raise ValueError(f"frequency_pairs: strategy must be 'high' or 'low', got {strategy!r}")
    if not (isinstance(n_pairs, int) and 0 <= n_pairs <= head_dim // 2):
        raise ValueError(f"frequency_pairs: n_pairs must be an int in [0, {head_dim // 2}], got {n_pairs!r}")
    p = torch.arange(n_pairs) if strategy == "high" else torch.arange(head_dim // 2 - n_pairs, head_dim // 2)
    return p.expand(num_layers, n_pairs).clone()


def norm_pairs(steps: list, n_pairs: int) -> Tensor:
    """S_2-norm from one calibration prefill per layer (`Model.calibration`): a pair's contribution to q.k is bounded
    by ||q_pair|| ||k_pair||; mean norms over tokens, summed over each KV head's query heads and over the KV heads
    (pooled per layer, Deviation 2); the n_pairs largest per layer -> (L, n_pairs). Norms are rotation-invariant,
    so the post-RoPE queries and keys of a `Step` give the same ranking as the pre-RoPE ones."""
    out = []
    for s in steps:
        q, k = s.queries.float(), s.keys.float()  # (B, H, T, D), (B, H_kv, T, D)
        half = q.shape[-1] // 2
        if not (isinstance(n_pairs, int) and 0 <= n_pairs <= half):
            raise ValueError(f"norm_pairs: n_pairs must be an int in [0, {half}], got {n_pairs!r}")
        qn = torch.hypot(q[..., :half], q[..., half:]).mean(dim=(0, 2))  # (H, D/2)
        kn = torch.hypot(k[..., :half], k[..., half:]).mean(dim=(0, 2))  # (H_kv, D/2)
        score = (qn.view(kn.shape[0], -1, half) * kn[:, None]).sum(dim=(0, 1))  # (D/2,)
        out.append(score.topk(n_pairs).indices.sort().values)
    return torch.stack(out)


def rope_dims(pairs: Tensor, head_dim: int) -> Tensor:
    """(..., n) pairs -> (..., 2n) head dims that keep RoPE, sorted: p and p + D/2 for each kept pair p."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=-1).sort(dim=-1).values


def _check_pairs(pairs: Tensor, num_layers: int, head_dim: int) -> None:
    ok = (isinstance(pairs, Tensor) and pairs.dim() == 2 and pairs.shape[0] == num_layers
          and not pairs.is_floating_point() and not pairs.dtype == torch.bool)
    if ok and pairs.numel():
        ok = bool((pairs >= 0).all() and (pairs < head_dim // 2).all()) and all(
            len(set(row.tolist())) == len(row) for row in pairs)
    if not ok:
        raise ValueError(f"pairs must be an int tensor (L={num_layers}, n) of distinct frequency pairs in "
                         f"[0, {head_dim // 2}) per layer, got {pairs!r}")


def _drop_rope(keep: Tensor, module, args, kwargs):
    """Forward pre-hook of one attention layer: cos = 1, sin = 0 on the head dims outside `keep` (D,) bool."""
    if kwargs.get("position_embeddings") is None:
        raise ValueError("partial_rope: this attention layer gets no position_embeddings keyword (unsupported layout)")
    cos, sin = kwargs["position_embeddings"]
    k = keep.to(cos.device)
    kwargs["position_embeddings"] = (cos.masked_fill(~k, 1.0), sin.masked_fill(~k, 0.0))
    return args, kwargs


def partial_rope(model, pairs: Tensor):
    """A copy of a Llama-style causal LM whose attention layer i rotates queries and keys only on the frequency pairs
    pairs[i] (L, n); the other dims go unrotated (cos = 1, sin = 0). `model` is left as it was."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _check_pairs(pairs, config.num_hidden_layers, D)
    out = copy.deepcopy(model)
    if getattr(out.config, "_name_or_path", ""):  # its own name: calibration prefills are cached on disk by name
        tag = hashlib.sha1(pairs.cpu().numpy().tobytes() + str(tuple(pairs.shape)).encode()).hexdigest()[:8]
        out.config._name_or_path += f"+partial-rope-{tag}"
    decoder = out.get_decoder() if hasattr(out, "get_decoder") else out.model
    for i, layer in enumerate(decoder.layers):
        keep = torch.zeros(D, dtype=torch.bool)
        keep[rope_dims(pairs[i].cpu(), D)] = True
        layer.self_attn.register_forward_pre_hook(functools.partial(_drop_rope, keep), with_kwargs=True)
    return out


def _check_rank(rank: int, n_max: int, what: str) -> None:
    if not (isinstance(rank, int) and 1 <= rank <= n_max):
        raise ValueError(f"MLALatent: rank must be an int in [1, {n_max}] ({what}), got {rank!r}")


def svd_basis(w_k: Tensor, w_v: Tensor, head_dim: int, nope: Tensor, rank: int, balance: bool = False
              ) -> tuple[Tensor, float]:
    """SVD_joint of one layer's weights: w_k, w_v (H_kv D, d) as nn.Linear holds them, nope (D - 2n,) the head dims
    without RoPE -> (U_r (H_kv (D - 2n) + H_kv D, rank) fp32 orthonormal, s), [W_k,nope / s; W_v] = U S V^T."""
    H_kv, d = w_k.shape[0] // head_dim, w_k.shape[1]
    w_nope = w_k.float().view(H_kv, head_dim, d)[:, nope.to(w_k.device)].reshape(-1, d)
    s = float(w_nope.norm() / w_v.float().norm()) if balance and w_nope.numel() else 1.0
    w = torch.cat([w_nope / s, w_v.float()])
    _check_rank(rank, min(w.shape), f"the SVD of [W_k,nope; W_v] {tuple(w.shape)} has {min(w.shape)} directions")
    return torch.linalg.svd(w, full_matrices=False).U[:, :rank], s


def pca_basis(k: Tensor, v: Tensor, nope: Tensor, rank: int, balance: bool = False) -> tuple[Tensor, float]:
    """PCA of one layer's calibration states (TransMLA): k, v (B, H_kv, T, D), k unrotated on the dims `nope` ->
    (U_r (N, rank) fp32 orthonormal, s): the top eigenvectors of Z^T Z, Z = [k_nope / s; v] per token (B T, N)."""
    B, H, T, D = v.shape
    k_nope = k[..., nope.to(k.device)].float().transpose(1, 2).reshape(B * T, -1)
    vv = v.float().transpose(1, 2).reshape(B * T, H * D)
    s = float(k_nope.norm() / vv.norm()) if balance and k_nope.numel() else 1.0
    z = torch.cat([k_nope / s, vv], dim=1)
    _check_rank(rank, z.shape[1], f"the joint key/value state has {z.shape[1]} dims")
    return top_basis(z, rank)[0], s


class LatentStore(LayerStore):
    """One layer's cache: the latent c (B, T, r) and the RoPE key dims (B, H_kv, T, 2n); keys and values rebuilt
    from them on every read (the prompt's own attention included: the converted model never sees exact states)."""

    def __init__(self, method: "MLALatent", layer_idx: int, model: Model):
        self.method, self.layer, self.model = method, layer_idx, model
        self.basis: Optional[Tensor] = None  # (N, r) fp32: the converted model's W_UKV, not cache (not counted)
        self.c: Optional[Tensor] = None  # (B, T, r)
        self.k_rope: Optional[Tensor] = None  # (B, H_kv, T, 2n)

    def _setup(self, D: int, device) -> None:
        m, L = self.method, self.model.num_layers
        pairs = torch.arange(D // 2).expand(L, -1) if m.pairs is None else m.pairs
        _check_pairs(pairs, L, D)
        keep = torch.zeros(D, dtype=torch.bool)
        keep[rope_dims(pairs[self.layer], D)] = True
        self.rope, self.nope = keep.nonzero()[:, 0].to(device), (~keep).nonzero()[:, 0].to(device)
        if m.basis == "svd":
            if self.model.weights is None:
                raise ValueError("MLALatent: basis='svd' needs the model's projection weights (Model.weights)")
            w = self.model.weights(self.layer)
            basis, self.scale = svd_basis(w["k"], w["v"], D, self.nope, m.rank, m.balance)
        else:
            if self.model.calibration is None:
                raise ValueError("MLALatent: basis='pca' needs calibration prefills (Model.calibration)")
            step = self.model.calibration("stdlib", m.calib_tokens)[self.layer]  # of the converted model itself
            basis, self.scale = pca_basis(step.keys, step.values, self.nope, m.rank, m.balance)
        self.basis = basis.to(device)

    def append(self, k: Tensor, v: Tensor):
        B, H, T, D = k.shape
        if self.basis is None:
            self._setup(D, k.device)
        k_nope = k[..., self.nope].float().transpose(1, 2).reshape(B, T, -1) / self.scale  # unrotated dims
        z = torch.cat([k_nope, v.float().transpose(1, 2).reshape(B, T, H * D)], dim=-1)
        c = (z @ self.basis).to(k.dtype)  # (B, T, r), in the cache's dtype
        kr = k[..., self.rope]
        self.c = c if self.c is None else torch.cat([self.c, c], dim=1)
        self.k_rope = kr if self.k_rope is None else torch.cat([self.k_rope, kr], dim=2)
        n = self.c.shape[1]
        y = self.c.float() @ self.basis.T  # (B, n, N): z rebuilt, in fp32
        n_k = H * len(self.nope)
        keys = k.new_empty(B, H, n, D)
        keys[..., self.nope] = (y[..., :n_k] * self.scale).view(B, n, H, -1).transpose(1, 2).to(k.dtype)
        keys[..., self.rope] = self.k_rope
        values = y[..., n_k:].view(B, n, H, D).transpose(1, 2).to(v.dtype)
        return keys, values, None

    def nbytes(self) -> int:
        return nbytes(self.c, self.k_rope)


@dataclass
class MLALatent(KVMethod):
    """The cache of an MHA2MLA-converted model: a rank-r joint latent of the no-RoPE keys and the values, plus the
    keys' RoPE dims. Use it on the model `partial_rope(model, pairs)` returned, with the same pairs (`mha2mla`).

    Args:
        rank: latent dims per token and layer, int >= 1 (at most the joint dims H_kv (D - 2n) + H_kv D, and d_model
            for "svd"; checked when the first keys arrive). MHA2MLA's d_kv (`low_rank`) is rank / H_kv.
        pairs: (L, n) int, the frequency pairs that keep RoPE in each layer (`frequency_pairs`, `norm_pairs`);
            None: every pair (no partial RoPE; the latent then holds the values alone).
        basis: "svd" (MHA2MLA's SVD_joint of W_k,nope and W_v) or "pca" (TransMLA: calibration keys and values).
        balance: scale the no-RoPE keys to the values' norm before the decomposition (TransMLA's BKV).
        calib_tokens: calibration prefill length for "pca" (standard-library docstrings, `Model.calibration`; give
            `KVCache` the tokenizer, or the calibration text falls back to random tokens).
    """

    rank: int = 48
    pairs: Optional[Tensor] = None
    basis: str = "svd"
    balance: bool = False
    calib_tokens: int = 1024

    #: the prompt's own attention reads rebuilt keys and values, as the converted model computes them
    replayable = False

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"MLALatent: rank must be an int >= 1, got {self.rank!r}")
        if self.pairs is not None and not (isinstance(self.pairs, Tensor) and self.pairs.dim() == 2):
            raise ValueError(f"MLALatent: pairs must be None or an int tensor (L, n), got {self.pairs!r}")
        if self.basis not in ("svd", "pca"):
            raise ValueError(f"MLALatent: basis must be 'svd' or 'pca', got {self.basis!r}")
        if not isinstance(self.balance, bool):
            raise ValueError(f"MLALatent: balance must be a bool, got {self.balance!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens >= 8):
            raise ValueError(f"MLALatent: calib_tokens must be an int >= 8, got {self.calib_tokens!r}")

    def new_layer(self, layer_idx: int, model: Model) -> LatentStore:
        return LatentStore(self, layer_idx, model)


def mha2mla(model, rank: int, pairs: Tensor, **knobs):
    """(converted copy of `model` with partial RoPE on `pairs`, the MLALatent cache that goes with it)."""
    return partial_rope(model, pairs), MLALatent(rank=rank, pairs=pairs, **knobs)


def bytes_per_token(num_layers: int, rank: int, n_kv_heads: int, n_pairs: int, dtype_bytes: int = 2) -> int:
    """Closed form of the MLA cache's bytes per token (one batch row): latent + RoPE key dims, every layer."""
    return num_layers * (rank + 2 * n_pairs * n_kv_heads) * dtype_bytes
