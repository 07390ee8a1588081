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
The mean-value term runs in the model: the store's `mix` hook (`LayerStore.mix`) turns the attention over the
k keys read into alpha y + (1 - alpha) v_mean, per query head, with v_mean the running mean of the row's values
(an fp32 sum and count the store holds, updated as tokens arrive and counted in `nbytes`; a step reads its D
channels per KV head, not every value); `reallocate=False` gives alpha = 1 (official `reallocate_to_mean_value`).
Deviations: (1) The window and the current key count in k (official: k + 1 keys).
(2) Scores use the model's attention scaling times sqrt(||q||_1 / ||q[i1]||_1) (equal to 1 / tau for
scaling 1 / sqrt(d)).
(3) v_mean is mixed in fp32 and cast to the model's dtype once (official: the mean cast to the values' dtype
first); the official code recomputes it from every value each step, here it is a running sum (the same mean).

Presets: rank = head_dim / 8 (r = 16 of d = 128, the paper's 1/8-transfer setting), local window k / 4
(official sweeps); without ratio or budget, k = 128 tokens read (the paper's main sweeps). `ratio` sets the
READ budget k = round(n / ratio): memory held is the whole cache; a step also reads r of d channels of every key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, nbytes, repeat_kv
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
        reallocate: give the approximate attention mass of the keys not read, 1 - alpha, to the mean value
            (Algorithm 1, official default); False: plain attention over the keys read (alpha = 1).
    """

    rank: Optional[int] = None
    local_share: float = 0.25
    reallocate: bool = True

    DEFAULT_BUDGET = 128

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"SparQ: rank must be an int >= 1 or None, got {self.rank!r}")
        if not (isinstance(self.local_share, (int, float)) and 0 <= self.local_share <= 1):
            raise ValueError(f"SparQ: local_share must be a number in [0, 1], got {self.local_share!r}")
        if not isinstance(self.reallocate, bool):
            raise ValueError(f"SparQ: reallocate must be a bool, got {self.reallocate!r}")

    def new_layer(self, layer_idx: int, model: Model) -> "SparQStore":
        return SparQStore(self, layer_idx, model)


class SparQStore(RetrievalStore):
    """The whole cache; each decoding step reads r channels of every key, then its top-k keys and values, and
    (reallocate) the running mean value, which `mix` weighs by the approximate mass of the keys not read."""

    def __init__(self, method: SparQ, layer_idx: int, model: Model):
        super().__init__(method, layer_idx, model)
        self.v_sum: Optional[Tensor] = None  # (B, H_kv, D) fp32: sum of each row's real values so far
        self.v_count: Optional[Tensor] = None  # (B, H_kv, 1) fp32: how many
        self.alpha: Optional[Tensor] = None  # (B, H_kv, G) the last step's alpha; None: it read every key

    def observe(self, step: Step) -> None:
        self.alpha = None
        if not self.method.reallocate:
            return
        q = step.q_len  # this step's tokens are the last q held (a dense store appends at the end)
        real = step.valid[:, :, -q:, None].float()  # padding counts for nothing
        add_sum, add_count = (step.values[:, :, -q:].float() * real).sum(2), real.sum(2)
        if self.v_sum is None:
            self.v_sum, self.v_count = add_sum, add_count
        else:
            self.v_sum, self.v_count = self.v_sum + add_sum, self.v_count + add_count

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
        sel = top_k_mask(s_hat.sum(dim=2).masked_fill(~valid, float("-inf")), k, forced & valid)
        if not m.reallocate:
            return sel, nbytes(k_hat)
        self.alpha = (s_hat * sel[:, :, None]).sum(-1)  # (B, H_kv, G): approximate mass of the keys read
        return sel, nbytes(k_hat, self.v_sum, self.v_count)  # the running mean is read too

    def mix(self, step: Step, out: Tensor) -> Tensor:
        """Algorithm 1's output: alpha softmax(q K[i2]) V[i2] + (1 - alpha) v_mean; out (B, H, 1, D)."""
        if self.alpha is None:
            return out
        B, H_kv, G = self.alpha.shape
        a = self.alpha.reshape(B, H_kv * G, 1, 1)  # query head h = kv head h // G, as the queries are grouped
        v_mean = repeat_kv(self.v_sum / self.v_count.clamp(min=1), G)[:, :, None]  # (B, H, 1, D)
        return (a * out.float() + (1 - a) * v_mean).to(out.dtype)

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.v_sum, self.v_count)
