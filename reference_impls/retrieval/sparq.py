"""SparQ Attention: score every key from the query's r largest components, then read the top-k keys in full.

Paper: Ribar, Chelombiev, Hudlass-Galley, Blake, Luschi, Orr, "SparQ Attention: Bandwidth-Efficient LLM
Inference", arXiv 2312.04985 (ICML 2024), Algorithm 1: i1 = top-r of |q|; approximate scores
s^ = softmax(q[i1] . K[:, i1] / tau) with tau = sqrt(d ||q[i1]||_1 / ||q||_1) (the softmax temperature
correction); i2 = top-k of s^; y = alpha softmax(q . K[i2] / sqrt(d)) V[i2] + (1 - alpha) v_mean with
alpha = sum_{i in i2} s^_i; the paper's GQA listing (|q| summed over the group before top-r, s^ summed over the
group before top-k). `sparq_attention` is that algorithm, the reference.
Official code: https://github.com/graphcore-research/llm-inference-research (`llminference/methods/
ann_attention.py`, `SparseQ` and `AnnAttention`: the local window of the local_k newest keys always read,
local_k = k / 4 in the paper's sweeps; the current key comes on top of k).
Deviations: (1) The mean-value reallocation (1 - alpha) v_mean is NOT applied in the model: `select` can only
choose keys, attention then runs softmax over them (alpha = 1). `sparq_attention` computes the full
Algorithm 1 output and the notebook measures what the reallocation changes; applying it in the model needs a
store hook on the attention output, which the interface does not have. (2) The window and the current key
count in k (official: k + 1 keys).
(3) Scores use the model's attention scaling times sqrt(||q||_1 / ||q[i1]||_1) (equal to 1 / tau for
scaling 1 / sqrt(d)).

Presets: rank = head_dim / 8 (r = 16 of d = 128, the paper's 1/8-transfer setting), local window k / 4
(official sweeps); without ratio or budget, k = 128 tokens read (the paper's main sweeps). `ratio` sets the
READ budget k = round(n / ratio): memory held is the whole cache; a step also reads r of d channels of every key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, nbytes
from reference_impls.retrieval.base import RetrievalMethod, RetrievalStore, top_k_mask

__all__ = ["SparQ", "sparq_approx", "sparq_attention"]


def sparq_approx(q: Tensor, k: Tensor, rank: int, scaling: float, valid: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor]:
    """Step 1 of Algorithm 1: approximate attention from the `rank` largest |q| components of each GQA group.

    q (B, H, D) one query per head; k (B, H_kv, T, D); valid (B, H_kv, T) bool or None (all).
    Returns (s_hat (B, H_kv, G, T) fp32 approximate attention, k_hat (B, H_kv, T, rank) the key channels read).
    """
    B, H, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    qg = q.float().view(B, H_kv, H // H_kv, D)
    i1 = qg.abs().sum(dim=2).topk(rank, dim=-1).indices  # (B, H_kv, r): one channel set per group
    q_hat = torch.gather(qg, -1, i1[:, :, None].expand(-1, -1, qg.shape[2], -1))  # (B, H_kv, G, r)
    k_hat = torch.gather(k, -1, i1[:, :, None].expand(-1, -1, T, -1))  # (B, H_kv, T, r): only these are read
    # temperature correction: the r components carry ||q[i1]||_1 / ||q||_1 of the query's mass
    coverage = q_hat.abs().sum(-1) / qg.abs().sum(-1).clamp(min=1e-30)  # (B, H_kv, G)
    logits = torch.matmul(q_hat, k_hat.float().transpose(-1, -2)) * (scaling / coverage.sqrt()[..., None])
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1), k_hat


def sparq_attention(q: Tensor, k: Tensor, v: Tensor, *, rank: int, k_read: int, local: int, scaling: float,
                    reallocate: bool = True) -> Tensor:
    """Algorithm 1 end to end for one query per head, the reference (and what the model lacks: `reallocate`).

    q (B, H, D); k, v (B, H_kv, T, D), every key visible. The `local` newest keys are always read, k_read in all.
    Returns (B, H, D): alpha softmax(q K[i2]^T s) V[i2] + (1 - alpha) mean(V), or alpha = 1 without reallocation.
    """
    B, H, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    s_hat, _ = sparq_approx(q, k, rank, scaling)
    forced = (torch.arange(T, device=k.device) >= T - local).expand(B, H_kv, T)
    sel = top_k_mask(s_hat.sum(dim=2), torch.full((B,), k_read, device=k.device), forced)  # (B, H_kv, T)
    G = H // H_kv
    logits = torch.matmul(q.float().view(B, H_kv, G, D), k.float().transpose(-1, -2)) * scaling
    y = torch.matmul(torch.softmax(logits.masked_fill(~sel[:, :, None], float("-inf")), -1), v.float())
    if reallocate:
        alpha = (s_hat * sel[:, :, None]).sum(-1, keepdim=True)  # (B, H_kv, G, 1)
        y = alpha * y + (1 - alpha) * v.float().mean(dim=2, keepdim=True)
    return y.reshape(B, H, D)


@dataclass
class SparQ(RetrievalMethod):
    """Approximate scores from r query components pick the k keys a decoding query reads in full.

    Args (ratio, budget = k: see RetrievalMethod):
        rank: r, query components used to approximate (None: head_dim // 8, at least 1).
        local_share: the newest round(local_share * k) keys are always read (official sweeps: 0.25).
    """

    rank: Optional[int] = None
    local_share: float = 0.25

    DEFAULT_BUDGET = 128

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"SparQ: rank must be an int >= 1 or None, got {self.rank!r}")
        if not (isinstance(self.local_share, (int, float)) and 0 <= self.local_share <= 1):
            raise ValueError(f"SparQ: local_share must be a number in [0, 1], got {self.local_share!r}")

    def new_layer(self, layer_idx: int, model: Model) -> "SparQStore":
        return SparQStore(self, layer_idx, model)


class SparQStore(RetrievalStore):
    """The whole cache; each decoding step reads r channels of every key, then its top-k keys and values."""

    def choose(self, step: Step) -> Optional[tuple[Tensor, int]]:
        m, n = self.method, step.n_real()
        k = m.read_budget(n)
        if bool((k >= n).all()):
            return None
        D = step.keys.shape[-1]
        rank = min(m.rank or max(1, D // 8), D)
        valid = step.mask[:, :, -1]  # (B, H_kv, T)
        s_hat, k_hat = sparq_approx(step.queries[:, :, -1], step.keys, rank, step.scaling, valid)
        local = (k.double() * m.local_share).round().long().clamp(min=1)  # the current key at least
        forced = step.positions >= (n - local)[:, None, None]
        return top_k_mask(s_hat.sum(dim=2).masked_fill(~valid, float("-inf")), k, forced & valid), nbytes(k_hat)
