"""InfLLM: sinks + a local window + the memory blocks whose representative keys best match the query.

Paper: Xiao, Zhang, Han, Xiao, Lin, Zhang, Liu, Han, Sun, "InfLLM: Training-Free Long-Context Extrapolation for
LLMs with an Efficient Context Memory", arXiv 2402.04617 (NeurIPS 2024), Section 3.2: the context window is the
initial tokens, the local window and the top-k memory blocks; a block of l_bs evicted tokens is represented by
its r_k tokens that received the most attention inside their local window (representative score); a block's
relevance is the sum of q . k over its representatives.
Official code: https://github.com/thunlp/InfLLM (`inf_llm/attention/context_manager.py`: the local score is the
attention a token gets while it sits in a query's local window, summed over those queries; a block's vector is
the mean of its top-`repr_topk` keys per query head; blocks are ranked by q . vector summed over all heads of
the layer, one block set per layer; tokens past the local window not yet filling a block are read too).
Deviations: (1) The prompt is attended in full and memory retrieval starts at decoding (the paper streams the
prompt chunk by chunk through the same window); the prompt's local scores are its full-attention weights from
the queries within n_local tokens. (2) Keys keep their RoPE positions (InfLLM puts every memory token at the
same distance, n_local, from the query; our keys arrive rotated). (3) Nothing is offloaded: the whole cache is
held (memory ~1x, `kv_bytes`); what a query reads is `read_kv_bytes`. (4) The running local score is held (fp32,
per query head) only for tokens not yet in a block, and counted in `nbytes`, as are the block vectors.

Presets: without ratio or budget the official configs (`config/mistral-inf-llm.yaml`, `llama-3-inf-llm.yaml`):
n_init 128, n_local 4096, topk 16 blocks of 128 tokens, repr_topk 4. With a read budget b (= round(n / ratio) of
the prompt's n tokens, or `budget`), the benchmark seed's split (arXiv 2407.01527, `longctx_bench`
`infllm_utils.compress`): n_init = 2.1% of b, topk = 32.4% of b in whole blocks, the rest the local window (the
seed's floor of a 512-token window, its prefill chunk, is dropped since we prefill in full). With 128-token
blocks a prompt needs about 400 r tokens for one block to be retrieved: pass a smaller block_size on short prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step, nbytes, repeat_kv
from reference_impls.retrieval.base import RetrievalMethod, RetrievalStore, top_k_mask

__all__ = ["InfLLM", "infllm_block_scores", "infllm_representatives"]

PAPER = dict(n_init=128, n_local=4096, topk=16)  # official configs


def infllm_representatives(k_blocks: Tensor, scores: Tensor, repr_topk: int) -> Tensor:
    """Each block's vector: per query head, the mean of the repr_topk keys with the highest local score.

    k_blocks (H_kv, N, S, D) keys of N blocks of S tokens; scores (H, N, S) local scores. Returns (H, N, D) fp32.
    """
    H, H_kv, D = scores.shape[0], k_blocks.shape[0], k_blocks.shape[-1]
    k_h = repeat_kv(k_blocks[None], H // H_kv)[0]  # (H, N, S, D): a query head scores its KV head's keys
    top = scores.topk(repr_topk, dim=-1).indices  # (H, N, r)
    return torch.gather(k_h, 2, top[..., None].expand(-1, -1, -1, D)).float().mean(dim=2)


def infllm_block_scores(q: Tensor, reps: Tensor) -> Tensor:
    """Relevance of each block: sum over all heads of q_h . vector_h. q (B, H, D); reps (B, H, N, D) -> (B, N)."""
    return torch.einsum("bhd,bhnd->bn", q.float(), reps.float())


@dataclass
class InfLLM(RetrievalMethod):
    """Initial tokens + local window + top-k memory blocks, chosen per layer by representative keys.

    Args (ratio, budget: the READ budget b per decoding step, split as the seed does; see RetrievalMethod):
        n_init, n_local, topk: initial tokens, local window, blocks retrieved (None: from b, else the paper's).
        block_size: tokens per memory block (paper: 128). repr_topk: representative keys per block (paper: 4).
        init_share, retrieved_share: the split of b (seed: 0.021 and 0.324; the local window gets the rest).
    """

    n_init: Optional[int] = None
    n_local: Optional[int] = None
    topk: Optional[int] = None
    block_size: int = 128
    repr_topk: int = 4
    init_share: float = 0.021
    retrieved_share: float = 0.324

    def __post_init__(self):
        super().__post_init__()
        for knob, low in (("n_init", 0), ("n_local", 1), ("topk", 0)):
            value = getattr(self, knob)
            if value is not None and not (isinstance(value, int) and value >= low):
                raise ValueError(f"InfLLM: {knob} must be an int >= {low} or None, got {value!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"InfLLM: block_size must be an int >= 1, got {self.block_size!r}")
        if not (isinstance(self.repr_topk, int) and 1 <= self.repr_topk <= self.block_size):
            raise ValueError(f"InfLLM: repr_topk must be an int in [1, block_size], got {self.repr_topk!r}")
        shares = (self.init_share, self.retrieved_share)
        if not (all(isinstance(s, (int, float)) and s >= 0 for s in shares) and sum(shares) <= 1):
            raise ValueError(f"InfLLM: init_share and retrieved_share must be >= 0 with a sum <= 1, got {shares}")

    def sizes(self, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B,) prompt tokens -> (n_init, n_local, topk), each (B,) int64."""
        bs = self.block_size
        if self.ratio is None and self.budget is None:
            init, local, topk = (torch.full_like(n, PAPER[k]) for k in ("n_init", "n_local", "topk"))
        else:  # the seed's split of the read budget
            b = self.read_budget(n)
            init = (b * self.init_share).long()
            topk = (b * self.retrieved_share).long() // bs
            local = (b - init - topk * bs).clamp(min=1)
        fixed = {"n_init": self.n_init, "n_local": self.n_local, "topk": self.topk}
        init, local, topk = (torch.full_like(n, fixed[k]) if fixed[k] is not None else t
                             for k, t in zip(("n_init", "n_local", "topk"), (init, local, topk)))
        return init, local, topk

    def new_layer(self, layer_idx: int, model: Model) -> "InfLLMStore":
        return InfLLMStore(self, layer_idx, model)


class InfLLMStore(RetrievalStore):
    """The whole cache, block vectors reps (B, H, N, D) and the local score of the tokens not yet in a block."""

    def __init__(self, method: InfLLM, layer_idx: int, model: Model):
        super().__init__(method, layer_idx, model)
        self.sizes: Optional[tuple[Tensor, Tensor, Tensor]] = None  # n_init, n_local, topk per row
        self.reps: Optional[Tensor] = None  # (B, H, N, D) in the keys' dtype
        self.n_blocks: Optional[Tensor] = None  # (B,) blocks formed per row
        self.score: Optional[Tensor] = None  # (B, H, T - cut) fp32 local score of slots cut ..
        self.cut = 0

    def observe(self, step: Step) -> None:
        B, H, T = step.queries.shape[0], step.queries.shape[1], step.keys.shape[2]
        if self.sizes is None or step.compress:
            self.sizes = self.method.sizes(step.n_real())
        if self.score is None:
            self.n_blocks = torch.zeros(B, dtype=torch.long, device=step.keys.device)
            self.reps = step.keys.new_zeros(B, H, 0, step.keys.shape[-1])
            self.score = torch.zeros(B, H, 0, device=step.keys.device)
        pad = T - self.cut - self.score.shape[-1]  # this step's new slots
        self.score = torch.cat([self.score, self.score.new_zeros(B, H, pad)], dim=-1)

    def choose(self, step: Step) -> Optional[tuple[Tensor, int]]:
        n_init, _, topk = self.sizes
        if bool((self.n_blocks <= topk).all()):
            return None  # every block fits: read everything (nothing to look up)
        bs, N = self.method.block_size, self.reps.shape[2]
        pos = step.positions  # (B, H_kv, T)
        block = (pos - n_init[:, None, None]).div(bs, rounding_mode="floor")
        in_memory = (pos >= n_init[:, None, None]) & (block < self.n_blocks[:, None, None])
        rel = infllm_block_scores(step.queries[:, :, -1], self.reps)  # (B, N): one block set per layer
        rel = rel.masked_fill(torch.arange(N, device=rel.device) >= self.n_blocks[:, None], float("-inf"))
        chosen = top_k_mask(rel[:, None], topk)  # (B, 1, N)
        hit = torch.gather(chosen.expand(-1, pos.shape[1], -1), 2, block.clamp(0, N - 1))
        return ~in_memory | hit, nbytes(self.reps)  # every block vector was read to rank them

    def after_attention(self, step: Step) -> None:
        n_init, n_local, _ = self.sizes
        qpos, pos = step.q_positions, step.positions[:, :1, self.cut:]  # (B, q), (B, 1, T - cut)
        # the attention each token gets from queries that hold it in their local window (official local score)
        dist = qpos[:, None, :, None] - pos[:, :, None, :]  # (B, 1, q, T - cut)
        window = (dist >= 0) & (dist < n_local[:, None, None, None]) & (pos >= 0)[:, :, None, :]
        self.score += (step.probs()[..., self.cut:] * window).sum(dim=2)
        self._form_blocks(step, n_init, n_local)

    def _form_blocks(self, step: Step, n_init: Tensor, n_local: Tensor) -> None:
        """Blocks whose every token has left the local window get their vector (Sec. 3.2)."""
        bs, r = self.method.block_size, self.method.repr_topk
        n, T = step.n_real(), step.keys.shape[2]
        ready = ((n - n_local - n_init).clamp(min=0)).div(bs, rounding_mode="floor")  # (B,)
        width = int(ready.max())
        if width > self.reps.shape[2]:
            B, H, _, D = self.reps.shape
            self.reps = torch.cat([self.reps, self.reps.new_zeros(B, H, width - self.reps.shape[2], D)], dim=2)
        for b in range(n.shape[0]):
            j0, j1 = int(self.n_blocks[b]), int(ready[b])
            if j1 <= j0:
                continue
            s0 = int(T - n[b] + n_init[b]) + j0 * bs  # slot of the first token (left padding comes first)
            s1 = s0 + (j1 - j0) * bs
            kb = self.k[b, :, s0:s1].reshape(self.k.shape[1], j1 - j0, bs, -1)
            sb = self.score[b, :, s0 - self.cut:s1 - self.cut].reshape(-1, j1 - j0, bs)
            self.reps[b, :, j0:j1] = infllm_representatives(kb, sb, r).to(self.reps.dtype)
            self.n_blocks[b] = j1
        # local scores are needed only for tokens not yet in a block
        cut = int((T - n + torch.minimum(n_init + self.n_blocks * bs, n)).min())
        if cut > self.cut:
            self.score, self.cut = self.score[..., cut - self.cut:], cut

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.reps, self.score)
