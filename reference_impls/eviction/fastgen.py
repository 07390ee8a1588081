"""FastGen: profile each head's attention on the prompt, then give it the cheapest cache policy that recovers it.

Paper: Ge, Zhang, Liu, Zhang, Han, Gao, "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs",
arXiv 2310.01801 (ICLR 2024). Eq. (1): per head, the policy of least memory whose compressed attention map recovers
the full one up to 1 - T (Sec. 3.3, Alg. 1); Sec. 3.4: four basic policies (special tokens, punctuation, locality =
keys less than r_l * n back, frequency = the r_f * n keys of most accumulated attention) and the hybrid set of
Eq. (2), {special, +punct, +frequent, +local, full}, "+" = union of kept keys; r_l = r_f = 0.3 (Sec. 5.1).
Official code: none released (github.com/machilusZ/FastGen is a README pointing to the community reproduction
github.com/AnswerDotAI/cold-compress, `KVCacheHybrid` in cache.py).
Deviations:
(1) Recovery: Eq. (1) does not name its norm; we require the attention mass a policy keeps, averaged over the
    prompt's queries, to be >= T (how Sec. 4.1 reads a profile, and what cold-compress computes). The window is
    per query (relative distance); the other sets are the same for every query. Sets are nested: cheapest = first.
(2) GQA (the paper uses multi-head models only): a KV head takes the cheapest policy under which every query head
    of its group recovers T; its frequency score is the group's mean.
(3) Budget: the paper's knob is T and memory follows. For a target ratio each layer (and row) uses the highest T
    whose per-head policies fit H_kv * b tokens (b = round(n / ratio)); leftover slots go to the layer's best
    frequency scores, and if even C_special does not fit, its best-scored tokens stay (Ada-KV's layer-wide top-k,
    alpha = 0). So each layer holds H_kv * b tokens and T varies by layer, where the paper sets one T for the
    model. `recovery=T` is the paper's mode.
(4) Generation: new tokens are appended to every head and nothing is evicted while decoding; Alg. 2 also filters
    new tokens by each head's policy (a special-token head would not store an ordinary new token).
(5) Token classes (from `Model.tokenizer`, given to the cache): special = the tokenizer's special and added tokens (SmolLM2: <|im_start|>,
    <|im_end|> ...; chat-template role words are ordinary text); punctuation = entries whose decoded text has a
    punctuation character (ASCII or Unicode category P) and otherwise only whitespace, so "\\n" alone is not
    punctuation (cold-compress counts it). Without a tokenizer both sets are empty.
"""

from __future__ import annotations

import functools
import string
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.eviction.base import EvictingStore, EvictionMethod
from reference_impls.eviction.policies import Adaptive, Threshold

__all__ = ["FastGen", "POLICIES", "fastgen_policy", "fastgen_profile", "fastgen_threshold", "token_classes"]

POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")  # Eq. (2)
_LIFT = 2.0  # added to the frequency score (a mean attention, <= 1) of the tokens a head's policy keeps


def fastgen_profile(probs: Tensor, q_real: Tensor, q_pos: Tensor, k_pos: Tensor, special: Tensor, punct: Tensor,
                    n: Tensor, *, r_local: float, r_frequent: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (1)-(2) on the prompt's attention: the tokens each hybrid policy keeps and the attention it recovers.

    probs (B, H, q, T) attention of the prompt's q queries; q_real (B, q) bool, False for padding queries;
    q_pos (B, q), k_pos (B, H_kv, T) real-token positions (-1 = hole); special, punct (B, H_kv, T) bool; n (B,)
    tokens seen. Returns keep (B, H_kv, 5, T) bool, what each policy of POLICIES holds after the prompt (window =
    the last round(r_l n)); recovered (B, H_kv, 5), the attention mass each keeps, mean over real queries, min
    over the G query heads of the group (full = 1); freq (B, H_kv, T), the mean attention each key received,
    averaged over the group (the frequency score: accumulated attention / number of queries).
    """
    B, H, q, T = probs.shape
    H_kv = k_pos.shape[1]
    G = H // H_kv
    valid = k_pos >= 0
    w = q_real.to(probs.dtype)
    n_q = w.sum(-1).clamp(min=1)[:, None, None, None]
    col = torch.matmul(w[:, None, None, :], probs).view(B, H_kv, G, T) / n_q  # padding queries vote for nothing
    freq = col.mean(2)
    n_loc = (n.double() * r_local).round().long()
    n_freq = (n.double() * r_frequent).round().long()
    rank = freq.masked_fill(~valid, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    s = special & valid
    sp = s | (punct & valid)
    spf = sp | ((rank < n_freq[:, None, None]) & valid)
    local = valid & (k_pos >= (n - n_loc)[:, None, None])  # what the window holds once the prompt is read
    keep = torch.stack([s, sp, spf, spf | local, valid], dim=2)
    static = torch.einsum("bkgt,bkpt->bkgp", col, keep[:, :, :3].to(col.dtype))  # (B, H_kv, G, 3)
    # A query's window is the keys less than n_loc positions back: one run of the held keys, which are in time order
    # (holes and padding hold no attention; a running max sorts their positions in), so a cumulative sum along the
    # keys gives each query's attention inside its window on the tokens spf does not hold already.
    sorted_pos = k_pos.cummax(-1).values
    qp = q_pos[:, None, :].expand(B, H_kv, q).contiguous()
    lo = torch.searchsorted(sorted_pos, qp - n_loc[:, None, None], right=True)  # (B, H_kv, q): first key in window
    hi = torch.searchsorted(sorted_pos, qp, right=True)  # first key after the query's own
    run = (probs.view(B, H_kv, G, q, T) * (~spf)[:, :, None, None]).cumsum_(-1)

    def upto(i):  # (B, H_kv, G, q): attention on keys [0, i)
        idx = (i - 1).clamp(min=0)[:, :, None, :, None].expand(B, H_kv, G, q, 1)
        return run.gather(-1, idx).squeeze(-1) * (i > 0)[:, :, None]

    in_window = ((upto(hi) - upto(lo)) * w[:, None, None, :]).sum(-1) / n_q[..., 0]  # (B, H_kv, G)
    local_mass = static[..., 2] + in_window
    full = torch.ones_like(local_mass)
    recovered = torch.cat([static, local_mass[..., None], full[..., None]], -1).amin(2)  # GQA: every head of the group
    return keep, recovered, freq


def fastgen_policy(recovered: Tensor, threshold: Tensor) -> Tensor:
    """(B, H_kv) index into POLICIES: the first (= cheapest, the sets are nested) that recovers >= threshold (B,)."""
    return (recovered < threshold[:, None, None]).sum(-1).clamp(max=len(POLICIES) - 1)


def fastgen_threshold(recovered: Tensor, cost: Tensor, total: Tensor) -> Tensor:
    """(B,) the highest T whose per-head policies hold <= total (B,) tokens; -1 (all C_special) if none does.

    recovered, cost (B, H_kv, 5). Only the recovered values can change a choice, so they are the candidates.
    """
    cand = recovered.flatten(1)  # (B, N)
    pick = (recovered[:, None] < cand[:, :, None, None]).sum(-1).clamp(max=len(POLICIES) - 1)  # (B, N, H_kv)
    used = cost[:, None].expand(-1, cand.shape[1], -1, -1).gather(-1, pick[..., None]).squeeze(-1).sum(-1)
    return torch.where(used <= total[:, None], cand, -1.0).amax(-1)


@functools.lru_cache(maxsize=8)  # decoding the whole vocabulary takes ~1 s; an evaluation asks once per cache
def token_classes(tokenizer) -> tuple[frozenset, frozenset]:
    """(special ids, punctuation ids) of a Hugging Face tokenizer's vocabulary (Deviation 5)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    marks = set(string.punctuation)

    def is_punct(c):
        return c in marks or unicodedata.category(c).startswith("P")

    punct = {i for i, t in enumerate(texts) if any(map(is_punct, t)) and all(is_punct(c) or c.isspace() for c in t)}
    return frozenset(special), frozenset(punct - special)


@dataclass
class FastGen(EvictionMethod):
    """Per-head hybrid policies from a profile of the prompt's attention; compresses the prefill only.

    Args:
        ratio: target tokens seen / tokens kept per layer (Deviation 3).
        budget: average tokens kept per head (the layer keeps H_kv * budget); overrides ratio.
        r_local, r_frequent: window and heavy-hitter shares of the prompt length (paper: 0.3, 0.3).
        recovery: the paper's threshold T in [0, 1]; when set, ratio is ignored and memory follows the profile.
        special_ids, punct_ids: token ids of C_special and C_punct; by default read from the cache's tokenizer.
    """

    r_local: float = 0.3
    r_frequent: float = 0.3
    recovery: Optional[float] = None
    special_ids: frozenset = field(default=frozenset(), repr=False)
    punct_ids: frozenset = field(default=frozenset(), repr=False)
    heads: Any = field(default_factory=lambda: Adaptive(alpha=0.0))  # the policy tokens first, then the layer's best
    _ids: Optional[Callable] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        for attr in ("r_local", "r_frequent", "recovery"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1) and not (attr == "recovery" and value is None):
                raise ValueError(f"FastGen: {attr} must be a number in [0, 1]{' or None' * (attr == 'recovery')}, "
                                 f"got {value!r}")
        if self.recovery is not None and self.budget is not None:
            raise ValueError("FastGen: set recovery (memory follows the profile) or budget, not both")
        if self.recovery is not None:  # the paper's mode: each head holds exactly its profiled policy's tokens
            self.heads = Threshold(_LIFT)
        for attr in ("special_ids", "punct_ids"):
            ids = getattr(self, attr)
            if not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"FastGen: {attr} must hold token ids (ints >= 0), got {sorted(ids, key=str)[:5]!r}")
            setattr(self, attr, frozenset(ids))

    def new_layer(self, layer_idx: int, model: Model) -> EvictingStore:
        """A store for this model: the token classes come from its tokenizer (unless given), the held tokens'
        ids from the cache (`Model.token_ids`)."""
        classes = token_classes(model.tokenizer) if model.tokenizer is not None else (frozenset(), frozenset())
        bound = replace(self, special_ids=self.special_ids or classes[0], punct_ids=self.punct_ids or classes[1])
        bound._ids = model.token_ids
        return EvictingStore(bound, layer_idx, model)

    def _classes(self, step: Step) -> tuple[Tensor, Tensor]:
        """(special, punct), each (B, H_kv, T) bool, from the ids of the held tokens."""
        pos = step.positions
        if not (self.special_ids or self.punct_ids):
            return torch.zeros_like(pos, dtype=torch.bool), torch.zeros_like(pos, dtype=torch.bool)
        if self._ids is None:
            raise ValueError("FastGen: special_ids/punct_ids need the token ids, which the cache does not know because "
                             "the model was fed embeddings; feed input ids, or build the cache without a tokenizer")
        ids = self._ids(pos)
        return tuple(torch.isin(ids, torch.tensor(sorted(s), dtype=ids.dtype, device=ids.device))
                     for s in (self.special_ids, self.punct_ids))

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        """The frequency score, lifted by _LIFT on the tokens of each head's profiled policy (kept first)."""
        B, H_kv, T, _ = step.keys.shape
        special, punct = self._classes(step)
        keep, recovered, freq = fastgen_profile(step.probs(), step.q_real, step.q_positions, step.positions, special,
                                                punct, step.n_real(), r_local=self.r_local, r_frequent=self.r_frequent)
        if self.recovery is None:
            threshold = fastgen_threshold(recovered, keep.sum(-1), H_kv * budget)
        else:
            threshold = torch.full((B,), float(self.recovery), device=freq.device)
        policy = fastgen_policy(recovered, threshold)
        kept = keep.gather(2, policy[:, :, None, None].expand(B, H_kv, 1, T)).squeeze(2)
        return torch.where(kept, _LIFT + freq, freq)
