"""Shared by the low-rank projection methods (Palu, Eigen Attention): keys and values held as latents.

A method supplies, per layer, one orthonormal basis P (g D, r) per group of g consecutive KV heads for keys and
one for values (`LowRankProjection.bases`). The store then holds only latents, the coordinates of each token's
group vector on its basis, and rebuilds keys and values when attention reads them:

    h_k = [k_pre]_group P_k  (B, n, T, r_k)   held      k = RoPE(ungroup(h_k P_k^T))   read
    h_v = [v]_group     P_v  (B, n, T, r_v)   held      v = ungroup(h_v P_v^T)         read

Keys reach a store after RoPE; a rotation is undone exactly (`rotate(..., inverse=True)`), so the latent of the
pre-RoPE key is taken, and RoPE is applied again to the rebuilt key (the "RoPE-aware" reconstruction both papers
use: RoPE does not commute with a projection). A basis (n, g D, r) with n = 1 is shared by every group.

Held per store: the latents (in the cache's dtype), the two bases once per layer (model-side factors, counted
in `nbytes` so a short prompt shows their cost) and each row's first position (B, H_kv, 1) int32. A block of
consecutive positions keeps only its offset (an int); any other block keeps its positions (B, H_kv, n) int32.
Each forward pass attends over its own new keys and values exactly; they become latents right after attention
(the quantizers' buffered store, `QuantizedStore`, with nothing kept in full precision).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.base import Model, Step
from reference_impls.quantization.kvquant import apply_rope
from reference_impls.quantization.store import QuantizedStore, Quantizer

__all__ = ["LowRankProjection", "group_heads", "project", "reconstruct", "rotate", "top_basis", "ungroup_heads"]


def group_heads(x: Tensor, g: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H_kv / g, T, g D): the g consecutive heads of a group side by side (the layout of
    nn.Linear's output features, head after head)."""
    B, H, T, D = x.shape
    return x.view(B, H // g, g, T, D).permute(0, 1, 3, 2, 4).reshape(B, H // g, T, g * D)


def ungroup_heads(x: Tensor, g: int) -> Tensor:
    """(B, n, T, g D) -> (B, n g, T, D), the inverse of `group_heads`."""
    B, n, T, gD = x.shape
    return x.view(B, n, T, g, gD // g).permute(0, 1, 3, 2, 4).reshape(B, n * g, T, gD // g)


def project(x: Tensor, basis: Tensor, g: int) -> Tensor:
    """Latents of x (B, H_kv, T, D) on basis (n, g D, r), n = H_kv / g or 1 (shared): (B, n', T, r)."""
    return group_heads(x, g) @ basis.to(x.dtype)


def reconstruct(h: Tensor, basis: Tensor, g: int) -> Tensor:
    """Vectors (B, H_kv, T, D) rebuilt from latents h (B, n', T, r): the projection of x onto span(basis)."""
    return ungroup_heads(h @ basis.to(h.dtype).transpose(-1, -2), g)


def top_basis(samples: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """PCA without centering: the top-r eigenvectors (d, r) of samples^T samples, samples (N, d), and every
    eigenvalue (d,) in decreasing order (the squared singular values of samples), in fp64."""
    s = samples.double()
    evals, evecs = torch.linalg.eigh(s.T @ s)  # ascending
    return evecs.flip(-1)[:, :r].float(), evals.flip(-1).clamp(min=0)


def rotate(x: Tensor, positions: Tensor, rope: Optional[Callable], inverse: bool) -> Tensor:
    """Apply (or undo) the model's RoPE on keys x (B, H_kv, n, D) at positions (B, H_kv, n); -1 (padding) takes
    position 0. Without a rotary embedding (rope None) keys are returned as they are."""
    if rope is None:
        return x
    B, H, n, D = x.shape
    cos, sin = (t.to(x.device).view(B, H, n, D) for t in rope(positions.clamp(min=0).reshape(B, H * n)))
    return apply_rope(x, cos, sin, inverse)


@dataclass
class LowRankProjection(Quantizer):
    """Base of the low-rank projection methods: subclasses write `bases(layer_idx, model, H_kv, D)`, called once
    per cache and layer, when the layer's first keys arrive (their shape gives H_kv and D)."""

    _rope: Optional[Callable] = field(default=None, init=False, repr=False, compare=False)
    _model: Optional[Model] = field(default=None, init=False, repr=False, compare=False)
    _layer: int = field(default=0, init=False, repr=False, compare=False)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def bases(self, layer_idx: int, model: Model, H_kv: int, D: int) -> tuple[Tensor, int, Tensor, int]:
        """(P_k (n_k, g_k D, r_k), g_k, P_v (n_v, g_v D, r_v), g_v) for this layer, orthonormal columns."""
        raise NotImplementedError

    def new_layer(self, layer_idx: int, model: Model) -> QuantizedStore:
        if self._memo.get("model") is not model:  # one set of bases per cache and layer (Compose re-makes stores)
            self._memo.clear()
            self._memo["model"] = model
        bound = replace(self)
        bound._rope, bound._model, bound._layer, bound._memo = model.rope, model, layer_idx, self._memo
        return QuantizedStore(bound, model)

    def layer_bases(self, H_kv: int, D: int) -> tuple[Tensor, int, Tensor, int]:
        key = (self._layer, H_kv, D)
        if key not in self._memo:
            self._memo[key] = self.bases(self._layer, self._model, H_kv, D)
        return self._memo[key]

    def encode(self, k: Tensor, v: Tensor, step: Step, state: dict) -> dict:
        B, H, n, D = k.shape  # the step's newest n tokens
        pk, gk, pv, gv = self.layer_bases(H, D)
        positions = step.positions[..., -n:]
        if "k_basis" not in state:  # the factors, once per layer, in the cache's dtype
            state["k_basis"], state["v_basis"], state["groups"] = pk.to(k.dtype), pv.to(v.dtype), (gk, gv)
            state["start"] = (positions[..., -1:] - (n - 1)).to(torch.int32)  # the last token is always real
            state["seen"] = 0
        offset, state["seen"] = state["seen"], state["seen"] + n
        expected = state["start"] + offset + torch.arange(n, device=k.device)
        pos = offset if bool((expected == positions)[positions >= 0].all()) else positions.to(torch.int32)
        pre = rotate(k.float(), positions, self._rope, inverse=True)  # (B, H_kv, n, D) keys before RoPE
        return dict(k=project(pre, state["k_basis"].float(), gk).to(k.dtype),
                    v=project(v.float(), state["v_basis"].float(), gv).to(v.dtype), pos=pos)

    def decode(self, block: dict, dtype: torch.dtype, state: dict) -> tuple[Tensor, Tensor]:
        gk, gv = state["groups"]
        pos = block["pos"]
        if isinstance(pos, int):
            pos = state["start"] + pos + torch.arange(block["k"].shape[2], device=state["start"].device)
        k = reconstruct(block["k"].float(), state["k_basis"].float(), gk)  # computed in fp32, returned in dtype
        v = reconstruct(block["v"].float(), state["v_basis"].float(), gv)
        return rotate(k, pos.long(), self._rope, inverse=False).to(dtype), v.to(dtype)
