"""Loki: keys live in a low-dimensional subspace; score them in its top PCA directions, read the top-k exactly.

Paper: Singhania, Singh, He, Feizi, Bhatele, "Loki: Low-rank Keys for Efficient Sparse Attention", arXiv
2406.02542 (NeurIPS 2024): Section 3 (keys' PCA: a small rank explains most of their variance, and the basis
found on one dataset transfers to others), Algorithm 1 (project q and K on the first d principal components,
approximate scores (q P_d)(K P_d)^T / sqrt(D), top-k keys, exact attention over them), Section 5.2 (PCA of
pre-rotary keys was as good as post-rotary on Llama2 and much better on Llama3 and Mistral).
Official code: https://github.com/hpcgroup/loki (`pca_analysis/pca.py`: per layer and KV head, sklearn PCA of
the saved keys; `methods/pca_topk/modify_llama.py` + `utils.py`: the basis, from pre- or post-rotary keys, is
applied to the post-rotary keys and queries; top-k of the approximate scores).
Deviations: (1) GQA: one key set per KV head, the top-k of the approximate attention (softmax of the rank-d
scores) summed over the group's query heads (the official code repeats the keys per query head and selects
per query head). (2) The basis comes from `Model.calibration("stdlib", calib_tokens)` (standard-library
docstrings, one prefill) instead of WikiText / C4 / BookCorpus keys. (3) Keys are held in the model's
coordinates and projected when scoring (as the official PyTorch path does); the bytes read count the rank-d
key coordinates the scores used, as Loki's kernel reads them from keys stored in PCA coordinates.
(4) Keys are not centred before projecting (as in the official code); the basis is the centred PCA's.
(5) Pre-RoPE calibration keys are recovered by undoing the model's rotation (`Model.rope`, the rotate-half layout
of Llama-style models); a model without a rotary embedding has no difference between the two.

Presets: rank d = head_dim / 4 and k = n / 4 without ratio or budget (d_f = k_f = 0.25, the paper's main
setting); PCA of pre-RoPE keys (Section 5.2; `keys="post"` is the official `infer.py` default). `ratio` sets
the READ budget k = round(n / ratio): memory held is the whole cache plus the basis (H_kv x D x d per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, nbytes
from reference_impls.retrieval.base import RetrievalMethod, RetrievalStore, top_k_mask

__all__ = ["Loki", "loki_pca", "loki_scores", "unrotate"]


def loki_pca(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Principal directions of each KV head's keys.

    keys (B, H_kv, T, D) -> (basis (H_kv, D, D) columns by decreasing variance, explained variance ratio (H_kv, D)).
    """
    x = keys.float().transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[-1])  # (H_kv, B T, D)
    x = x - x.mean(dim=1, keepdim=True)  # PCA centres the data (sklearn does)
    cov = x.transpose(1, 2) @ x / max(x.shape[1] - 1, 1)  # (H_kv, D, D)
    var, vec = torch.linalg.eigh(cov)  # ascending
    var, vec = var.flip(-1).clamp(min=0), vec.flip(-1)
    return vec, var / var.sum(-1, keepdim=True).clamp(min=1e-30)


def unrotate(keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Undo RoPE (rotate-half layout): keys (B, H_kv, T, D) rotated by (cos, sin) (B, T, D) -> pre-RoPE keys."""
    k, c, s = keys.float(), cos[:, None].float(), sin[:, None].float()
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * c - rotated_half * s  # the rotation by -theta


def loki_scores(q: Tensor, k_proj: Tensor, basis: Tensor, scaling: float) -> Tensor:
    """Approximate attention logits in the top-d principal directions.

    q (B, H, D) one query per head; k_proj (B, H_kv, T, d) = K P_d; basis (H_kv, D, d) = P_d.
    Returns (B, H_kv, G, T) fp32: (q P_d)(K P_d)^T * scaling.
    """
    B, H, D = q.shape
    H_kv = basis.shape[0]
    q_proj = torch.matmul(q.float().view(B, H_kv, H // H_kv, D), basis.float())  # (B, H_kv, G, d)
    return torch.matmul(q_proj, k_proj.float().transpose(-1, -2)) * scaling


@dataclass
class Loki(RetrievalMethod):
    """Approximate scores in a calibrated rank-d key subspace pick the k keys a decoding query reads.

    Args (ratio, budget = k: see RetrievalMethod):
        rank: d, principal directions scored (None: head_dim // 4, at least 1).
        keys: "pre" or "post": the PCA of the calibration keys before or after RoPE (applied to post-RoPE keys).
        calib_text, calib_tokens: the calibration prefill the PCA is computed on (`Model.calibration`).
    """

    rank: Optional[int] = None
    keys: str = "pre"
    calib_text: str = "stdlib"
    calib_tokens: int = 1024

    DEFAULT_RATIO: ClassVar[Optional[float]] = 4.0

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"Loki: rank must be an int >= 1 or None, got {self.rank!r}")
        if self.keys not in ("pre", "post"):
            raise ValueError(f"Loki: keys must be 'pre' or 'post', got {self.keys!r}")
        if not (isinstance(self.calib_tokens, int) and self.calib_tokens >= 8):
            raise ValueError(f"Loki: calib_tokens must be an int >= 8, got {self.calib_tokens!r}")

    def new_layer(self, layer_idx: int, model: Model) -> "LokiStore":
        if model.calibration is None:
            raise ValueError("Loki needs calibration keys: Model.calibration is None (build the cache from a model)")
        step = model.calibration(self.calib_text, self.calib_tokens)[layer_idx]
        keys = step.keys  # post-RoPE, (1, H_kv, T, D)
        if self.keys == "pre" and model.rope is not None:
            keys = unrotate(keys, *model.rope(step.positions[:, 0]))
        D = keys.shape[-1]
        rank = min(self.rank or max(1, D // 4), D)
        basis, _ = loki_pca(keys)
        return LokiStore(self, layer_idx, model, basis[:, :, :rank].to(step.keys.dtype).contiguous())


class LokiStore(RetrievalStore):
    """The whole cache plus the layer's PCA basis P_d (H_kv, D, d), held and counted."""

    def __init__(self, method: Loki, layer_idx: int, model: Model, basis: Tensor):
        super().__init__(method, layer_idx, model)
        self.basis = basis

    def choose(self, step: Step) -> Optional[tuple[Tensor, int]]:
        n = step.n_real()
        k = self.method.read_budget(n)
        if bool((k >= n).all()):
            return None
        basis = self.basis.to(step.keys.device)
        k_proj = torch.matmul(step.keys, basis.to(step.keys.dtype))  # (B, H_kv, T, d): what the scores read
        valid = step.mask[:, :, -1]  # (B, H_kv, T)
        logits = loki_scores(step.queries[:, :, -1], k_proj, basis, step.scaling)
        probs = torch.softmax(logits.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)  # (B, H_kv, G, T)
        score = probs.sum(dim=2).masked_fill(~valid, float("-inf"))
        return top_k_mask(score, k), nbytes(k_proj, self.basis)

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.basis)
