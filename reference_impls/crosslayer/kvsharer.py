"""KVSharer: some layers reuse the KV cache of an earlier, deliberately dissimilar layer, chosen on calibration text.

Paper: Yang, Cao, Chen, Qin, Yang, Zhao, Chen, "KVSharer: Efficient Inference via Layer-Wise Dissimilar KV Cache
Sharing", arXiv 2410.18517, Section 3 (the strategy search): average every layer's KV cache over a calibration
set, rank the layer pairs by the Euclidean distance of those averages, most DISSIMILAR first, then walk the
ranking: the later layer of a pair uses the earlier layer's cache if the shared model's output (last hidden
state) stays cosine-similar to the full model's above a threshold T, until the target number of layers share.
Official code: https://github.com/yangyifei729/KVSharer (`test_llama.ipynb`: search; `llama_real_share/`: inference)
Presets from the official notebook: T = 0.5; the distance of two layers is the mean over heads and tokens of the L2
distance between their key vectors, likewise for values, the two averaged; a chain of shares resolves to the
first layer (`re_map`); a shared layer attends with its owner's cache from the prefill on.
Deviations: (1) A method cannot run the model with sharing from inside the cache (the interface hands it
calibration prefills and projection weights, not the model), so the acceptance check is a proxy computed from the
calibration prefill: the cosine similarity of the attention part of the residual stream, sum_l W_o^l
softmax(q_l k_o(l)^T) v_o(l) over all layers, with the plan's owners o(l) against each layer's own cache. It keeps
the official check's global nature (one shared layer changes one of L terms) but ignores embeddings, MLPs and the
change of later layers' inputs. A per-layer check (one layer's attention output with another layer's cache) is
useless here: another layer's values live in another basis, its similarity is ~0 for every pair. The same T = 0.5
applies to the proxy. (2) Calibration is one prefill of `calibration_tokens` tokens of `calibration` text
(`Model.calibration`; standard-library prose) instead of 30 Wikipedia lines of 64 tokens averaged position by
position. (3) round(L (1 - 1/ratio)) layers share; when the ranking runs out first, fewer
do (as the official loop). (4) `share_prefill=False` (not in the paper) lets shared layers attend with their own
states during the prompt and read the owner's from decoding on; a replayed prefill (`replay.py`, the benchmark)
measures that variant whatever the knob says, as it takes every layer's prompt states from an uncompressed run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.base import DenseStore, KVMethod, LayerStore, Model, Step, attention_probs, repeat_kv

__all__ = ["KVSharer", "kvsharer_distances", "kvsharer_ranking", "kvsharer_search", "resolve", "attention_output"]

_plans: dict = {}  # id of a calibration prefill's layer-0 keys -> (weakref to them, {knobs: plan}); dropped with them


def kvsharer_distances(keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """(L, L) distance of layers' (averaged) caches, each (B, H_kv, T, D): mean over B, H_kv, T of ||k_i - k_j||_2,
    the same for values, the two averaged (the official notebook's `compute_euclidean_distance`)."""
    K, V = torch.stack([k.float() for k in keys]), torch.stack([v.float() for v in values])  # (L, B, H_kv, T, D)
    rows = [((K[i] - K).norm(dim=-1).mean(dim=(1, 2, 3)) + (V[i] - V).norm(dim=-1).mean(dim=(1, 2, 3))) / 2
            for i in range(len(keys))]
    return torch.stack(rows)


def kvsharer_ranking(dist: Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j), i > j (layer i would use layer j's cache), most distant first; ties in (i, j) order."""
    pairs = [(i, j) for i in range(dist.shape[0]) for j in range(i)]
    d = torch.stack([dist[i, j] for i, j in pairs])
    return [pairs[n] for n in torch.sort(d, descending=True, stable=True).indices.tolist()]


def resolve(owner: list[int]) -> list[int]:
    """Every layer's owner followed to the end of its chain (owners are earlier layers): the official `re_map`."""
    out = list(owner)
    for i, o in enumerate(out):
        out[i] = i if o == i else out[o]
    return out


def attention_output(step: Step, k: Tensor, v: Tensor, w_o: Optional[Tensor]) -> Tensor:
    """What a layer's attention adds to the residual stream, (B, T, d_model): W_o softmax(q k^T) v for its queries
    (the `step`'s) over keys/values (B, H_kv, T, D), its own or another layer's; W_o (d_model, H D) or None."""
    G = step.queries.shape[1] // step.keys.shape[1]
    out = attention_probs(step.queries, k, step.mask, step.scaling) @ repeat_kv(v.float(), G)  # (B, H, T, D)
    out = out.transpose(1, 2).flatten(2)  # (B, T, H D), the heads concatenated as o_proj reads them
    return out if w_o is None else out @ w_o.float().T


def kvsharer_search(steps: list[Step], n_share: int, threshold: float, w_o: Optional[list] = None,
                    ranking: Optional[list[tuple[int, int]]] = None) -> dict:
    """The greedy search on calibration steps (one per layer): walk the ranking (default: `kvsharer_ranking` of the
    steps' distances), accept a pair when the plan's output stays similar (> threshold) to the full model's on the
    proxy of Deviation 1, stop at `n_share` shared layers. w_o: each layer's o_proj weight (or None).
    Returns {"owner": layer -> layer whose cache it reads, "distances": (L, L), "tried": [(i, j, similarity,
    accepted)]}."""
    L = len(steps)
    w_o = w_o or [None] * L
    dist = kvsharer_distances([s.keys for s in steps], [s.values for s in steps])

    def out(layer, src):  # layer's attention output with layer src's cache
        return attention_output(steps[layer], steps[src].keys, steps[src].values, w_o[layer])

    cur = [out(n, n) for n in range(L)]  # each layer's output under the plan accepted so far
    full = sum(cur)
    total, owner, tried = full, list(range(L)), []
    for i, j in kvsharer_ranking(dist) if ranking is None else ranking:
        if sum(o != n for n, o in enumerate(owner)) >= n_share:
            break
        if owner[i] != i:  # already shared
            continue
        trial = owner.copy()
        trial[i] = j
        trial = resolve(trial)  # i, and the layers that read i's cache, now read j's owner's
        changed = {n: out(n, o) for n, o in enumerate(trial) if o != owner[n]}
        shared = total + sum(x - cur[n] for n, x in changed.items())
        sim = float(torch.cosine_similarity(full.flatten(1), shared.flatten(1), dim=-1).mean())
        tried.append((i, j, sim, sim > threshold))
        if sim > threshold:
            owner, total = trial, shared
            for n, x in changed.items():
                cur[n] = x
    return {"owner": owner, "distances": dist, "tried": tried}


class SharedStore(LayerStore):
    """A layer that attends with its owner's keys and values and holds nothing (with `share_prefill=False`, its own
    until the compressing pass ends)."""

    def __init__(self, stores: list, owner: int, share_prefill: bool):
        self.stores, self.owner = stores, owner
        self.own: Optional[DenseStore] = None if share_prefill else DenseStore()

    def append(self, k: Tensor, v: Tensor):
        if self.own is not None:
            return self.own.append(k, v)
        src = self.stores[self.owner]  # an earlier layer: it appended this pass's tokens already
        return src.k, src.v, None

    def after_attention(self, step: Step) -> None:
        if step.compress:
            self.own = None  # from now on the owner's cache

    def nbytes(self) -> int:
        return 0 if self.own is None else self.own.nbytes()


@dataclass
class KVSharer(KVMethod):
    """Layers share an earlier layer's cache per a plan searched on calibration text once per model.

    Args:
        ratio: L / (L - shared layers) (paper's main setting: 25% of layers share, 4/3); 1 shares none.
        threshold: T, the similarity every shared layer's attention output must keep (official notebook: 0.5).
        calibration: calibration text for `Model.calibration` ("stdlib", "passkey", "repeat", "random").
        calibration_tokens: its length.
        share_prefill: shared layers read the owner's cache during the prompt too (the paper's way; see Deviation 4).
        order: "dissimilar" walks the most distant pairs first (the paper's); "similar" the closest first (the
            intuitive alternative the paper argues against).
    """

    ratio: float = 4 / 3
    threshold: float = 0.5
    calibration: str = "stdlib"
    calibration_tokens: int = 512
    share_prefill: bool = True
    order: str = "dissimilar"

    @property
    def replayable(self) -> bool:
        """Sharing during the prompt changes the prompt's own attention: a benchmark must prefill it live."""
        return not self.share_prefill

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"KVSharer: ratio must be a number >= 1, got {self.ratio!r}")
        if not (isinstance(self.threshold, (int, float)) and -1 <= self.threshold <= 1):
            raise ValueError(f"KVSharer: threshold must be a number in [-1, 1], got {self.threshold!r}")
        if not (isinstance(self.calibration_tokens, int) and self.calibration_tokens >= 8):
            raise ValueError(f"KVSharer: calibration_tokens must be an int >= 8, got {self.calibration_tokens!r}")
        if self.order not in ("dissimilar", "similar"):
            raise ValueError(f"KVSharer: order must be 'dissimilar' or 'similar', got {self.order!r}")

    def n_share(self, num_layers: int) -> int:
        return min(round(num_layers * (1 - 1 / self.ratio)), num_layers - 1)

    def plan(self, model: Model) -> dict:
        """The search's result for this model (see `kvsharer_search`), memoised with its calibration prefill."""
        if model.calibration is None:
            raise ValueError("KVSharer needs calibration prefills (Model.calibration); build the cache with KVCache")
        steps = model.calibration(self.calibration, self.calibration_tokens)
        keys = steps[0].keys  # memoised with the model's calibration prefill (tensors hash by identity only here)
        if _plans.get(id(keys), (lambda: None,))[0]() is not keys:
            _plans[id(keys)] = (weakref.ref(keys, lambda _, i=id(keys): _plans.pop(i, None)), {})
        per_model = _plans[id(keys)][1]
        key = (self.n_share(model.num_layers), self.threshold, self.order)
        if key not in per_model:
            w_o = None if model.weights is None else [model.weights(n)["o"] for n in range(model.num_layers)]
            ranking = None
            if self.order == "similar":
                ranking = kvsharer_ranking(kvsharer_distances([s.keys for s in steps], [s.values for s in steps]))[::-1]
            per_model[key] = kvsharer_search(steps, key[0], self.threshold, w_o, ranking)
        return per_model[key]

    def new_layer(self, layer_idx: int, model: Model) -> LayerStore:
        if self.n_share(model.num_layers) == 0:
            return DenseStore()
        owner = self.plan(model)["owner"][layer_idx]
        return DenseStore() if owner == layer_idx else SharedStore(model.stores, owner, self.share_prefill)

    @classmethod
    def from_ratio(cls, ratio: float, /, **knobs) -> "KVSharer":
        return cls(ratio=ratio, **knobs)
