"""CAKE: slice the cache budget between layers by each layer's attention preference, in a cascade as layers are
prefilled, and evict tokens by the mean plus the variance of their attention over the observation window.

Paper: Ziran Qin, Yuchen Cao, Mingbao Lin, Wen Hu, Shixuan Fan, Ke Cheng, Weiyao Lin, Jianguo Li, "CAKE: Cascading
and Adaptive KV Cache Eviction with Layer Preferences", arXiv 2503.12491 (ICLR 2025), the method's equations: the
spatial dispersion H_l (entropy of the window's attention over the prefix) and temporal shift V_l (its variance across the
window's queries) give a preference P_l = H_l^(1/tau1) V_l^(1/tau2); budgets B_l = P_l / sum_k P_k B_total; the
cascade: after layer m is prefilled, B_total is split over layers 0..m and each evicts down to its share, so memory
never exceeds B_total; indicator I_i = mean_{j in W} A_{j,i} + gamma var_{j in W} A_{j,i}.
Official code: https://github.com/antgroup/cakekv (`cake/model/modify_llama.py`: preference and indicator;
`cake/cake_cache.py` `CakeprefillKVCache`: the cascade; `cake/utils.py` `adjust_budgets`)

How: a CAKE store keeps, at the compressing pass, its layer's indicator (and positions) beside the held tokens
(`history`, counted in nbytes while the cascade runs) and its preference; the store of layer l computes the stage
budgets of layers 0..l (`policies.cascade_budgets`), keeps its own share and shrinks the earlier layers' stores to
theirs through the LayerStore interface (append nothing, then `after_attention` with its retained step), so a
quantizer composed with CAKE re-packs what is kept. After the last layer the indicators are dropped.
Deviations:
(1) Per row: H_l, V_l, P_l and the budgets are computed per batch row (the official code sums over the batch,
    run with batch 1), so a padded batch allocates each row as if alone.
(2) Clipping: a layer's share is capped at n - w and the excess re-spread in proportion to the preferences,
    rounded by largest remainder so each stage adds up exactly; `adjust_budgets` truncates the shares, spreads
    the excess evenly and can leave a stage a few tokens off. The official code also skips compression when
    n <= cache_size + window; here a layer is evicted whenever it holds more than its share.
(3) Decoding: compresses the compressing pass only; the official code also evicts one token per decoding step
    (`CakeDecodingKVCache_LayerWise`, by the new token's attention) to hold each layer at its budget.
(4) A layer already shrunk by the cascade cannot grow back when a later stage gives it more (capped layers' excess):
    it keeps what it has, as in the official code, so a stage can then hold fewer than B_total.
(5) The CAKE stores of one cache find each other through the list `new_layer` builds (a cache makes its layers
    in order); composed with a quantizer the earlier layers are reached through `Model.stores` (the cache's
    stores), without it CAKE inside `Compose` raises.
(6) layers="uniform" or "pyramid" replaces the cascade: CAKE's indicator then ranks tokens under that policy's
    budgets (the default "cascade" is the paper).
Presets: window 32, gamma 200, tau1 = tau2 = 1, kernel 5 avg pooling (official `pred_cake.py` defaults and
`modify_llama.py`; `model2tau.json` tunes tau per model, e.g. Llama-3.1-8B at cache 1024: 1.6, 0.4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.base import Model, Step, repeat_kv
from reference_impls.eviction.base import EvictingStore, EvictionMethod, keep_top
from reference_impls.eviction.policies import Cascade, cascade_budgets, parse_policy

__all__ = ["CAKE", "CakeStore", "cake_indicator", "cake_preference"]


def cake_preference(probs: Tensor, prefix: Tensor, tau1: float, tau2: float) -> Tensor:
    """P = H^(1/tau1) V^(1/tau2) per row: probs (B, H, w, T) the window's attention, prefix (B, H_kv, T) bool.

    H = -sum p log(p + 1e-10) over heads, window queries and prefix keys (spatial dispersion); V = the variance of
    each prefix key's attention across the window's queries (unbiased, as torch.var), summed over heads and keys
    (temporal shift); both as the official code computes them. Returns (B,) float64.
    """
    p = probs.double() * repeat_kv(prefix, probs.shape[1] // prefix.shape[1])[:, :, None, :]
    disp = -(p * torch.log(p + 1e-10)).sum((1, 2, 3))
    var = p.var(dim=2, correction=1 if p.shape[2] > 1 else 0).sum((1, 2))
    return disp ** (1 / tau1) * var ** (1 / tau2)


def cake_indicator(probs: Tensor, prefix: Tensor, *, gamma: float, kernel_size: int) -> Tensor:
    """I = mean + gamma var of each key's attention across the window's queries, pooled over the prefix.

    probs (B, H, w, T); prefix (B, H_kv, T) bool (the keys ranked: not the window, not padding). Avg pooling of
    width kernel_size over the prefix (zeros beyond it), then the mean over each GQA group (official code).
    Returns (B, H_kv, T), 0 outside the prefix.
    """
    B, H, w, T = probs.shape
    G = H // prefix.shape[1]
    ind = probs.mean(dim=2) + gamma * probs.var(dim=2, correction=1 if w > 1 else 0)  # (B, H, T)
    outside = ~repeat_kv(prefix, G)
    ind = F.avg_pool1d(ind.masked_fill(outside, 0.0), kernel_size, stride=1, padding=kernel_size // 2)
    return ind.masked_fill(outside, 0.0).view(B, H // G, G, T).mean(dim=2)


class CakeStore(EvictingStore):
    """One layer under CAKE's cascade: evicts at its own stage, shrinks the earlier layers at each later one."""

    def __init__(self, method: "CAKE", layer_idx: int, model: Model, peers: list):
        super().__init__(method, layer_idx, model)
        self.peers = peers  # this cache's CakeStores, by layer
        self.preference: Optional[Tensor] = None  # (B,) P_l of the last compressing pass
        self.stage: Optional[Step] = None  # that pass's step (queries ...), to re-run `after_attention` on
        self.pending: Optional[Tensor] = None  # (B,) the budget a later stage asks this layer for

    def held(self) -> Tensor:
        """(B, H_kv, W) bool: the held slots that hold a token, in the layout `append` hands attention."""
        if self.slots is not None:
            return self.slots >= 0
        return torch.ones(self.history.shape[:3], dtype=torch.bool, device=self.history.device)

    def evict(self, step: Step) -> Optional[tuple[Tensor, Tensor]]:
        m = self.method
        if self.pending is not None:  # a later layer's stage shrinks this one
            budget, self.pending = self.pending, None
            return self._keep(budget, self.held())
        if not isinstance(m.layers, Cascade):  # CAKE's indicator under another layer policy: a plain scorer
            return super().evict(step)
        if not step.compress:
            return None
        n = step.n_real()
        obs, prefix, scores = m.indicator(step)
        self.preference = cake_preference(obs.probs(), prefix, m.tau1, m.tau2)
        self.history = torch.stack([scores, step.positions.to(scores.dtype)], dim=-1)  # (B, H_kv, T, 2)
        self.stage = dataclasses.replace(step, keys=None, values=None, _mask=None, _probs=None)
        L, l = self.model.num_layers, self.layer_idx
        if m.cascading or l == L - 1:  # non-cascading: every layer waits for the last (official use_cascading=False)
            b = torch.full_like(n, m.budget) if m.budget is not None else (n.double() / m.ratio).round().long()
            prefs = torch.stack([p.preference for p in self.peers[: l + 1]], dim=-1)
            budgets = cascade_budgets(prefs, n, b.clamp(min=1), L, m.window)  # (B, l + 1)
            for k in range(l):
                self._shrink(k, budgets[:, k], step)
            own = budgets[:, l]
        else:
            own = step.valid.sum(-1).max(-1).values  # keep every real token until the last layer
        dropped = self._keep(own, step.valid)
        if l == L - 1:  # the cascade is over: the indicators served it only
            for p in self.peers:
                p.history, p.stage = None, None
        return dropped

    def _shrink(self, k: int, budget: Tensor, step: Step) -> None:
        """Ask layer k's store to keep `budget` (B,) tokens per head: append nothing, then re-run its step."""
        inner = self.peers[k]
        held = inner.counts if inner.counts is not None else inner.held().sum(-1)
        if not bool((held > budget[:, None]).any()):
            return
        stores = getattr(self.model, "stores", None)
        outer = stores[k] if stores else inner
        if outer is inner and inner.k is None:
            raise ValueError("CAKE: the cascade re-evicts earlier layers, whose data a composed store holds; "
                             "it needs Model.stores (the cache's stores) to reach them")
        inner.pending = budget
        outer.append(step.keys[:, :, :0], step.values[:, :, :0])  # the held tokens, padded, for a step
        pos = inner.history[..., 1].long().masked_fill(~inner.held(), -1)
        outer.after_attention(dataclasses.replace(inner.stage, keys=inner.k, values=inner.v, positions=pos))

    def _keep(self, budget: Tensor, valid: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Keep each head's `budget` (B,) best tokens among `valid` (B, H_kv, W) by the held indicator; returns
        (idx, hole) as EvictingStore.evict does, None when nothing is dropped."""
        self.row_budget = budget
        n_valid = valid.sum(-1)
        if bool((n_valid <= budget[:, None]).all()) and bool(valid.all()):
            return None
        scores = self.history[..., 0].masked_fill(~valid, float("-inf"))
        counts = torch.minimum(self.method.heads.head_counts(scores, budget, self.method.window), n_valid)
        idx, hole = keep_top(scores, counts)
        self.keep(idx, hole)
        return idx, hole


@dataclass
class CAKE(EvictionMethod):
    """Preference-proportional layer budgets assigned in a cascade, tokens ranked by mean + gamma variance.

    Args (ratio, budget = the official cache_size per layer, window included; heads: see EvictionMethod):
        layers: "cascade" (default: CAKE's allocation, with tau1, tau2, cascading), or "uniform" / "pyramid" (or a
            policy object): CAKE's indicator as a plain scorer under that policy, no preference, no cascade.
        window: the observation window (the last queries of the compressing pass), always kept.
        gamma: weight of the variance in the indicator. tau1, tau2: temperatures of H_l and V_l in P_l.
        kernel_size: odd avg-pooling width of the indicator. cascading: shrink the earlier layers at every stage
            (False: every layer keeps everything until the last layer's stage; same end state, more memory).
    """

    layers: Any = "cascade"
    window: int = 32
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    kernel_size: int = 5
    cascading: bool = True

    def __post_init__(self):
        # the base accepts only the layer policies its own store runs; CakeStore also runs the cascade
        layers, self.layers = self.layers, "uniform"
        super().__post_init__()
        self.layers = parse_policy(layers, "CAKE: layers", ("cascade", "uniform", "pyramid"))
        for knob, ok, allowed in (
                ("window", isinstance(self.window, int) and self.window >= 1, "an int >= 1"),
                ("gamma", isinstance(self.gamma, (int, float)) and self.gamma >= 0, "a number >= 0"),
                ("tau1", isinstance(self.tau1, (int, float)) and self.tau1 > 0, "a number > 0"),
                ("tau2", isinstance(self.tau2, (int, float)) and self.tau2 > 0, "a number > 0"),
                ("kernel_size", isinstance(self.kernel_size, int) and self.kernel_size % 2 == 1 and self.kernel_size >= 1,
                 "an odd int >= 1"),
                ("cascading", isinstance(self.cascading, bool), "a bool")):
            if not ok:
                raise ValueError(f"CAKE: {knob} must be {allowed}, got {getattr(self, knob)!r}")

    def indicator(self, step: Step) -> tuple[Step, Tensor, Tensor]:
        """(the window's step, the prefix (B, H_kv, T) bool, scores (B, H_kv, T)): the indicator of every prefix
        key, the window above all of it (most recent first)."""
        obs = step.last(self.window)
        in_window = step.valid & (step.positions >= (step.n_real() - obs.q_len)[:, None, None])
        prefix = step.valid & ~in_window
        ind = cake_indicator(obs.probs(), prefix, gamma=self.gamma, kernel_size=self.kernel_size)
        return obs, prefix, torch.where(in_window, ind.max() + 1 + step.positions.to(ind.dtype), ind)

    def score(self, step: Step, history: Optional[Tensor], budget: Tensor) -> Tensor:
        return self.indicator(step)[2]

    def new_layer(self, layer_idx: int, model: Model) -> CakeStore:
        if layer_idx == 0:
            self._peers: list = []  # one list per cache: a cache makes its stores in layer order
        if layer_idx != len(self._peers):
            raise RuntimeError("CAKE: a cache must make its stores in layer order, one cache at a time")
        store = CakeStore(self, layer_idx, model, self._peers)
        self._peers.append(store)
        return store
