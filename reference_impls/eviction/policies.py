"""Budget policies: how many tokens each layer, then each head, keeps. Any eviction scorer takes any of them
(Cascade: see below).

An eviction method has two policy fields: `layers` turns the uniform per-layer budget b = round(n / ratio)
into this layer's budget, `heads` turns the layer's budget into one count per KV head from the scorer's
scores. The total over layers and heads stays what uniform eviction keeps, so methods compare at equal
memory. Both take the scorer's protected `window` (SnapKV's observation window, kept whatever the budget).

    | policy                  | field  | paper                                  |
    |-------------------------|--------|----------------------------------------|
    | Uniform()               | both   | every layer and head keeps b           |
    | Pyramid(beta)           | layers | PyramidKV, arXiv 2406.02069, Sec. 3    |
    | Adaptive(alpha, rule)   | heads  | Ada-KV, arXiv 2407.11550, Alg. 1       |
    | Threshold(min_score)    | heads  | FastGen's recovery mode (arXiv 2310.01801): a head keeps every key its scorer lifted |
    | Cascade()               | layers | CAKE, arXiv 2503.12491: budgets in proportion to each layer's preference, recut as layers are prefilled |
    | Squeeze(p, groups)      | layers | SqueezeAttention, arXiv 2404.04793: k-means groups of layers by how little attention changes their input; the least changed group keeps p b |

Cascade needs what `layer_budget` does not see (the layer's attention, the other layers' stores), so it is run by
a store that can revisit earlier layers (`eviction/cake.py`'s); `cascade_budgets` is its allocation. EvictionMethod
accepts only the policies its own store runs (uniform, pyramid for `layers`), so a scorer takes Cascade only
through such a store. Squeeze likewise needs each layer's similarity, which its method (`eviction/squeezeattention.py`)
measures and binds to the policy; `squeeze_budgets` is its allocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

__all__ = ["Adaptive", "Cascade", "Pyramid", "Squeeze", "Threshold", "Uniform", "adakv_counts", "cascade_budgets",
           "kmeans_1d", "parse_policy", "proportional_budgets", "pyramid_budgets", "squeeze_budgets"]


@dataclass(frozen=True)
class Uniform:
    """Every layer keeps the uniform budget; every head keeps the layer's budget."""

    #: counts follow the budget, so a layer within budget keeps everything without scoring
    budgeted: ClassVar[bool] = True

    def layer_budget(self, n: Tensor, budget: Tensor, layer_idx: int, num_layers: int, window: int) -> Tensor:
        """(B,) tokens per head in this layer; n (B,) tokens seen, budget (B,) the uniform budget (<= n)."""
        return budget

    def head_counts(self, scores: Tensor, budget: Tensor, window: int) -> Tensor:
        """(B, H_kv) tokens each head keeps; scores (B, H_kv, T) (-inf where nothing may be kept)."""
        return budget[:, None].expand(scores.shape[0], scores.shape[1])


def pyramid_budgets(n: Tensor, budget: Tensor, num_layers: int, window: int = 0, beta: float = 20) -> Tensor:
    """(B, L) integer per-layer budgets, decreasing with depth, each row summing to L * budget[b].

    n (B,) tokens seen, budget (B,) the uniform per-layer budget (<= n), window: tokens every layer keeps on
    top of its pyramid share (the scorer's observation window). The official schedule (KVCache-Factory
    `PyramidKVCluster`): b_l = w + max - l (max - min) / (L - 1), min = (b - w) / beta, max = 2 (b - w) - min,
    here in floating point and rounded by largest remainder so the layers add up to exactly L * b (the official
    code floors, kvpress rounds per layer: both can miss it by up to L tokens). Like the official code, every
    layer keeps b (uniform) where the pyramid does not apply: when n < 2 (b - w) (at 1.5k tokens and w = 64,
    every ratio below ~1.84x) and when b <= w (above about n / w x); where the bottom layer would exceed the
    prompt, it is clipped to n - w and the top raised to keep the total (the official rule).
    """
    n, b = n.double(), budget.double()
    share = b - window  # the part of the budget the pyramid redistributes
    lo = share / beta
    hi = 2 * share - lo
    over = hi > n - window  # the bottom layer cannot keep more than the whole prompt
    hi = torch.where(over, n - window, hi)
    lo = torch.where(over, 2 * share - hi, lo)
    l = torch.arange(num_layers, dtype=torch.float64, device=n.device)
    steps = (hi - lo) / max(num_layers - 1, 1)
    exact = window + hi[:, None] - l[None, :] * steps[:, None]  # (B, L), mean = b
    fits = (share > 0) & (lo >= 0) & (hi >= lo) & (n >= 2 * share)  # official: uniform when n < 2 (b - w)
    exact = torch.where(fits[:, None], exact, b[:, None].expand_as(exact))
    floor = exact.floor()
    missing = (b[:, None] * num_layers - floor.sum(-1, keepdim=True)).round().long()  # (B, 1)
    rank = (floor - exact).argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = largest fractional part
    return floor.long() + (rank < missing).long()


@dataclass(frozen=True)
class Pyramid(Uniform):
    """PyramidKV's per-layer budgets (see `pyramid_budgets`); beta: top layer keeps (b - w) / beta (official 20)."""

    beta: float = 20

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and self.beta >= 1):
            raise ValueError(f"Pyramid: beta must be a number >= 1, got {self.beta!r}")

    def layer_budget(self, n, budget, layer_idx, num_layers, window):
        return pyramid_budgets(n, torch.minimum(budget, n), num_layers, window, self.beta)[:, layer_idx]


def adakv_counts(scores: Tensor, budget: Tensor, alpha: float = 0.2, window: int = 0, rule: str = "official") -> Tensor:
    """(B, H_kv) tokens each head keeps: a guaranteed share per head, then a top-(H_kv b) over the layer.

    scores (B, H_kv, T), -inf where nothing may be kept; budget (B,) average tokens per head; window: the
    scorer's protected tokens, scored above the rest. Guaranteed per head, rule "official" (the Ada-KV code,
    `floor_alpha`): the window plus floor(alpha (b - w)) prefix tokens; rule "kvpress" (AdaKVPress):
    floor(alpha b) tokens, window included (so below ~5 windows of budget no prefix token is protected).
    """
    B, H, T = scores.shape
    b = budget.double()
    n_safe = (window + (alpha * (b - window).clamp(min=0)).floor()).long() if rule == "official" else (alpha * b).floor().long()
    n_safe = torch.minimum(n_safe, budget)
    s = scores.float().clone()
    width = int(n_safe.max())
    if width > 0:  # lift each head's best n_safe above every other score (not above -inf holes)
        top = s.topk(min(width, T), dim=-1).indices
        lift = (torch.arange(top.shape[-1], device=s.device) < n_safe[:, None, None]) & s.gather(-1, top).isfinite()
        s.scatter_(-1, top, torch.where(lift, torch.finfo(s.dtype).max, s.gather(-1, top)))
    total = H * budget  # (B,) the layer's tokens, as many as uniform allocation
    flat = s.reshape(B, H * T).topk(min(int(total.max()), H * T), dim=-1).indices
    chosen = (torch.arange(flat.shape[1], device=s.device) < total[:, None]) & s.reshape(B, -1).gather(
        -1, flat).isfinite()
    picked = torch.zeros(B, H * T, device=s.device).scatter_(-1, flat, chosen.float())
    return picked.view(B, H, T).sum(-1).long()


@dataclass(frozen=True)
class Adaptive(Uniform):
    """Ada-KV's adaptive split of a layer's H_kv * b tokens across its heads by a layer-wide top-k of the scores.

    alpha: the guaranteed share (official and kvpress: 0.2); rule: "official" (window + floor(alpha (b - w)) per
    head, the Ada-KV code) or "kvpress" (floor(alpha b) per head, kvpress's AdaKVPress).
    """

    alpha: float = 0.2
    rule: str = "official"

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"Adaptive: alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.rule not in ("official", "kvpress"):
            raise ValueError(f"Adaptive: rule must be 'official' or 'kvpress', got {self.rule!r}")

    def head_counts(self, scores, budget, window):
        return adakv_counts(scores, budget, self.alpha, window, self.rule)


@dataclass(frozen=True)
class Threshold(Uniform):
    """Each head keeps every key scored at least `min_score` (memory follows the scores, not a budget)."""

    min_score: float = 0.0
    budgeted: ClassVar[bool] = False

    def head_counts(self, scores, budget, window):
        return (scores >= self.min_score).sum(-1)


def proportional_budgets(weights: Tensor, total: Tensor, cap: Tensor) -> Tensor:
    """(B, m) integer shares of `total` (B,) in proportion to `weights` (B, m) >= 0, none above `cap` (B,).

    A share that would pass the cap is clipped to it and its excess spread over the others, again in proportion
    (water filling; all-zero weights split evenly); then rounded by largest remainder, so each row adds up to
    exactly min(total, m * cap) (total and cap integers).
    """
    w, total, cap = weights.double().clamp(min=0), total.double(), cap.double()[:, None]
    share = torch.zeros_like(w)
    free = torch.ones_like(w, dtype=torch.bool)
    for _ in range(w.shape[1]):  # every round clips at least one more layer, or ends
        rest = (total - torch.where(free, 0.0, share).sum(-1)).clamp(min=0)  # what the clipped layers leave
        wf = torch.where(free, w, 0.0)
        wf = torch.where(wf.sum(-1, keepdim=True) > 0, wf, free.double())  # no preference left: evenly
        share = torch.where(free, wf / wf.sum(-1, keepdim=True) * rest[:, None], share)
        over = free & (share > cap)
        if not bool(over.any()):
            break
        share, free = torch.where(over, cap, share), free & ~over
    floor = share.floor()
    missing = (share.sum(-1, keepdim=True) - floor.sum(-1, keepdim=True)).round().long()  # (B, 1)
    rank = (floor - share).argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = largest fractional part
    return floor.long() + (rank < missing).long()


def cascade_budgets(preferences: Tensor, n: Tensor, budget: Tensor, num_layers: int, window: int = 0) -> Tensor:
    """(B, m) per-layer budgets of the m layers prefilled so far: one stage of CAKE's cascade (arXiv 2503.12491).

    preferences (B, m) >= 0, one per prefilled layer; n (B,) tokens seen; budget (B,) the uniform per-layer budget
    b; window: tokens every layer keeps on top of its share (the scorer's observation window). The whole model's
    prefix budget L (b - w) goes to the m layers in proportion to their preferences, each at most n - w
    (`proportional_budgets`); so the layers prefilled so far never hold more than the budget of all L, and with
    m = L the split is final. Where b <= w every layer keeps b (as `pyramid_budgets` falls back to uniform).
    """
    share = budget - window
    split = window + proportional_budgets(preferences, num_layers * share.clamp(min=0), (n - window).clamp(min=0))
    return torch.where((share > 0)[:, None], split, budget[:, None].expand_as(split))


@dataclass(frozen=True)
class Cascade(Uniform):
    """CAKE's layer budgets: each layer's share in proportion to its preference, recut after every prefilled layer
    (`cascade_budgets`). A store that runs the cascade (CAKE's) asks for the budgets; `layer_budget` alone keeps
    every token, as a layer does until its preference is known."""

    def layer_budget(self, n, budget, layer_idx, num_layers, window):
        return n


def kmeans_1d(x: Tensor, k: int) -> Tensor:
    """(L,) labels of the optimal k-means clustering of the L numbers x into min(k, distinct values) clusters: 0 = the
    cluster of the lowest centre.

    Optimal clusters of numbers are runs of the sorted values, so the best split into k runs is found
    exactly by dynamic programming over the sorted values (O(k L^2)); Lloyd's iterations (sklearn's KMeans, as the
    SqueezeAttention code uses) reach it or a local optimum. Ties go to the lower cluster.
    """
    v, order = x.double().flatten().sort()
    L, k = v.numel(), min(k, int(v.unique().numel()))  # no more clusters than distinct values
    c1 = torch.cat([v.new_zeros(1), v.cumsum(0)]).tolist()
    c2 = torch.cat([v.new_zeros(1), (v * v).cumsum(0)]).tolist()

    def sse(i, j):  # squared deviations of v[i:j] from their mean
        return (c2[j] - c2[i]) - (c1[j] - c1[i]) ** 2 / (j - i)

    best = [[float("inf")] * (L + 1) for _ in range(k + 1)]
    cut = [[0] * (L + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, L + 1):
            for i in range(c - 1, j):  # the last run is v[i:j]
                cost = best[c - 1][i] + sse(i, j)
                if cost < best[c][j] - 1e-12:
                    best[c][j], cut[c][j] = cost, i
    labels, j = torch.empty(L, dtype=torch.long), L
    for c in range(k, 0, -1):
        labels[order[cut[c][j]:j]] = c - 1
        j = cut[c][j]
    return labels.to(x.device)


def squeeze_budgets(similarity: Tensor, n: Tensor, budget: Tensor, p: float, groups: int = 3, window: int = 0) -> Tensor:
    """(B, L) integer per-layer budgets of SqueezeAttention, each row summing to L * min(b, n) (as uniform keeps).

    similarity (B, L): each layer's cosine similarity between its input and its input plus its attention output (high =
    attention changed the tokens little); n (B,) tokens seen; budget (B,) the uniform budget b; window: tokens every
    layer keeps on top of its share. The layers are clustered by k-means into `groups`; the cluster of the highest
    centre keeps p (b - w) each, the others share the rest of L (b - w) evenly (the official code: class 3 keeps
    `KV_class3`, the rest a = (L b - |class 3| p b) / (L - |class 3|)). Rounded by largest remainder and capped at
    n - w, the excess re-spread in proportion (`proportional_budgets`), where the official code truncates. Every layer
    keeps b when all fall in one cluster, when b <= w, and when b >= n (the prompt fits).
    """
    L = similarity.shape[1]
    b = torch.minimum(budget, n)
    share = b - window
    weights = []
    for row, s in zip(similarity, share.double().tolist()):
        labels = kmeans_1d(row, groups)
        low = labels == labels.max()
        if bool(low.all()):  # one cluster: nothing to tell apart
            weights.append(torch.ones(L, dtype=torch.float64))
            continue
        rest = (L * s - int(low.sum()) * p * s) / int((~low).sum())
        weights.append(torch.where(low, p * s, rest).double().cpu())
    w = torch.stack(weights).to(n.device)
    split = window + proportional_budgets(w, L * share.clamp(min=0), (n - window).clamp(min=0))
    uniform = (share <= 0) | (budget >= n)  # the prompt fits: every layer keeps b (a decoding scorer then grows to b)
    return torch.where(uniform[:, None], budget[:, None].expand_as(split), split)


@dataclass(frozen=True)
class Squeeze(Uniform):
    """SqueezeAttention's layer budgets (`squeeze_budgets`). p: the share of the uniform budget left to the layers whose
    input attention changes least; groups: k-means clusters (paper and official code: 3). `similarity`, n (B,) ->
    (B, L) per-layer similarities of the prompt being compressed, is bound by the method that measures it
    (`SqueezeAttention.new_layer`)."""

    p: float = 0.38
    groups: int = 3
    similarity: Optional[Callable[[Tensor], Tensor]] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"Squeeze: p must be a number in (0, 1], got {self.p!r}")
        if not (isinstance(self.groups, int) and self.groups >= 2):
            raise ValueError(f"Squeeze: groups must be an int >= 2, got {self.groups!r}")

    def layer_budget(self, n, budget, layer_idx, num_layers, window):
        if self.similarity is None:
            raise ValueError("Squeeze: the layers' similarities are unknown; use it through SqueezeAttention, which "
                             "measures them")
        sim = self.similarity(n)
        if sim.shape[1] != num_layers:
            raise ValueError(f"Squeeze: {sim.shape[1]} layer similarities for a model of {num_layers} layers")
        return squeeze_budgets(sim, n, budget, self.p, self.groups, window)[:, layer_idx]


_BY_NAME = {"uniform": Uniform, "pyramid": Pyramid, "adaptive": Adaptive, "threshold": Threshold, "cascade": Cascade,
            "squeeze": Squeeze}


def parse_policy(value, field_name: str, allowed: tuple[str, ...]):
    """A policy object from itself or from its name (the CLI's `heads=adaptive`); errors name the allowed ones."""
    if isinstance(value, str) and value in allowed:
        return _BY_NAME[value]()
    if isinstance(value, tuple(_BY_NAME[a] for a in allowed)) and type(value).__name__.lower() in allowed:
        return value
    raise ValueError(f"{field_name} must be one of {', '.join(allowed)} (a name or a policy object), got {value!r}")
