"""TurboQuant: rotate each vector at random, then quantize every coordinate with one precomputed Lloyd-Max codebook.

Paper: Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization with Near-optimal Distortion
Rate", arXiv 2504.19874 (ICLR 2026): Lemma 1 (a coordinate of a uniform point on S^{d-1} has density
f(x) ~ (1 - x^2)^{(d-3)/2}), Eq. (4) (the scalar codebook: continuous 1-D k-means of f, solved by Lloyd-Max),
Algorithm 1 (TurboQuant_mse: y = Pi x, idx_j = nearest centroid of y_j, x~ = Pi^T c[idx]), Algorithm 2
(TurboQuant_prod: Algorithm 1 at b - 1 bits, then QJL on the residual r: sign(S r) and ||r||, dequantized as
x~_mse + sqrt(pi/2)/d ||r|| S^T sign(S r), unbiased for inner products, Theorem 2), Theorem 1 (unit vectors:
D_mse <= sqrt(3) pi/2 4^-b, about 0.36, 0.117, 0.03, 0.009 for b = 1..4); norms are kept in floating point
and rescale the unit vector (Section 1.3).
Official code: none released (the paper names none).
Deviations: (1) integer bits per coordinate only: the paper's KV runs (2.5 and 3.5 bits, Table 1, Section 4.3)
split the channels into an outlier and a regular set quantized by two TurboQuant instances at different bits
(its 2.5-bit example, 32 channels at 3 bits and 96 at 2, averages 2.25); the split rule is not stated and the
split is not implemented here. (2) The paper does not say which variant its KV runs use:
`variant` picks Algorithm 1 ("mse", default) or 2 ("prod") for keys; values always use Algorithm 1, their
products with attention weights being a weighted sum, not a query inner product. (3) One rotation Pi (Haar, QR
of a Gaussian matrix with R's diagonal signs folded in) and one QJL matrix S are drawn from `seed` and shared
by every layer and head; like weights they are not counted in nbytes. (4) Norms (and ||r||) are stored in
the cache's dtype (the paper: "floating-point precision"). (5) Every token is quantized as soon as it is
attended to, generated ones included, as the paper does; the tokens of the current forward attend in full
precision. (6) Codebooks are solved on a 2^16-point grid of f (to its fixed point), once per (d, bits).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from reference_impls.quantization.primitives import pack, unpack
from reference_impls.quantization.qjl import qjl_dequantize, qjl_projection, qjl_quantize
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer

__all__ = ["TurboQuant", "beta_pdf", "lloyd_max", "random_rotation", "turboquant_codebook",
           "turboquant_dequantize", "turboquant_quantize"]

_CODEBOOKS: dict[tuple[int, int], Tensor] = {}  # (d, bits) -> centroids, computed once


def beta_pdf(x: Tensor, d: int) -> Tensor:
    """Lemma 1: density of one coordinate of a uniform point on S^{d-1}, Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))
    (1 - x^2)^((d-3)/2) on (-1, 1); close to N(0, 1/d) for large d."""
    log_c = math.lgamma(d / 2) - math.lgamma((d - 1) / 2) - 0.5 * math.log(math.pi)
    return torch.exp(log_c + (d - 3) / 2 * torch.log1p(-x * x))


def lloyd_max(pdf: Callable[[Tensor], Tensor], lo: float, hi: float, levels: int, *, grid: int = 1 << 16,
              tol: float = 1e-12, max_iter: int = 20000) -> Tensor:
    """Centroids (levels,) fp64, ascending, minimizing E|X - c(X)|^2 for X ~ pdf on [lo, hi] (Lloyd 1982, Max
    1960): boundaries = midpoints of neighbouring centroids, centroids = the conditional mean of their cell,
    repeated to a fixed point. Integrals are sums over a midpoint grid (prefix sums, so one step is a search)."""
    x = lo + (hi - lo) * (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    w = pdf(x).double()
    w = w / w.sum()
    zero = torch.zeros(1, dtype=torch.float64)
    cw, cwx = torch.cat([zero, w.cumsum(0)]), torch.cat([zero, (w * x).cumsum(0)])
    # start from the high-resolution optimum (Panter-Dite: point density ~ pdf^(1/3)), then iterate
    comp = torch.cat([zero, (w ** (1 / 3)).cumsum(0)])
    c = x[torch.searchsorted(comp[1:], (torch.arange(levels, dtype=torch.float64) + 0.5) / levels * comp[-1])
          .clamp(max=grid - 1)]
    for _ in range(max_iter):
        edge = torch.searchsorted(x, (c[1:] + c[:-1]) / 2)  # cell k holds grid points edge[k-1] .. edge[k] - 1
        edge = torch.cat([edge.new_zeros(1), edge, edge.new_full((1,), grid)])
        mass = cw[edge[1:]] - cw[edge[:-1]]
        new = torch.where(mass > 0, (cwx[edge[1:]] - cwx[edge[:-1]]) / mass.clamp(min=1e-300), c)
        done = (new - c).abs().max() < tol
        c = new
        if done:
            break
    return c


def turboquant_codebook(d: int, bits: int) -> Tensor:
    """Eq. (4): the 2^bits Lloyd-Max centroids (fp64) of the Lemma 1 density in dimension d, cached."""
    if (d, bits) not in _CODEBOOKS:
        _CODEBOOKS[d, bits] = lloyd_max(lambda x: beta_pdf(x, d), -1.0, 1.0, 2 ** bits)
    return _CODEBOOKS[d, bits]


@functools.lru_cache(maxsize=16)
def random_rotation(d: int, seed: int) -> Tensor:
    """Pi (d, d) fp32, a Haar-random orthogonal matrix: QR of an i.i.d. N(0, 1) matrix (Section 3.1), with the
    signs of R's diagonal moved into Q so the distribution is exactly uniform (Mezzadri 2007). Cached: read-only."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).float()


def _mse_dequantize(idx: Optional[Tensor], norm: Tensor, D: int, b: int, seed: int) -> Tensor:
    """Algorithm 1 lines 9-10 rescaled by the stored norm: ||x|| Pi^T c[idx] -> (..., D) fp32 (0 when b = 0)."""
    if not b:
        return torch.zeros(*norm.shape, D, device=norm.device)
    Pi, c = random_rotation(D, seed).to(norm.device), turboquant_codebook(D, b).float().to(norm.device)
    return (c[idx.long()] @ Pi) * norm.float()[..., None]


def turboquant_quantize(x: Tensor, bits: int, *, seed: int = 0, prod: bool = False,
                        norm_dtype: torch.dtype = torch.float32) -> dict:
    """x (..., D) -> Algorithm 1 (prod=False) or 2 (prod=True) with `bits` per coordinate, codes unpacked:
    {"idx": uint8 (..., D) or None (prod with bits = 1), "norm": (...,) in norm_dtype, and for prod
    "sign": bool (..., D) (True = +1) and "rnorm": (...,) ||r|| in norm_dtype}."""
    D, x = x.shape[-1], x.float()
    norm = x.norm(dim=-1).to(norm_dtype)
    b = bits - 1 if prod else bits  # Algorithm 2 spends one bit per coordinate on QJL
    out = {"idx": None, "norm": norm}
    if b:
        Pi, c = random_rotation(D, seed).to(x.device), turboquant_codebook(D, b).float().to(x.device)
        y = (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)) @ Pi.T  # Algorithm 1 line 5, on the unit vector
        out["idx"] = torch.bucketize(y, (c[1:] + c[:-1]) / 2).to(torch.uint8)  # line 6: the nearest centroid
    if prod:  # Algorithm 2 lines 6-8: QJL of the residual of what the b-1 bits (and the stored norm) give back
        r = x - _mse_dequantize(out["idx"], norm, D, b, seed)
        sign, rnorm = qjl_quantize(r, qjl_projection(D, D, seed + 1).to(x.device))
        out.update(sign=sign, rnorm=rnorm.to(norm_dtype))
    return out


def turboquant_dequantize(q: dict, D: int, bits: int, *, seed: int = 0) -> Tensor:
    """Inverse of turboquant_quantize -> (..., D) fp32: Algorithm 1's reconstruction, plus for prod (a "sign" in q)
    Algorithm 2 line 11, sqrt(pi/2) / D * ||r|| * S^T sign(S r)."""
    prod = "sign" in q
    x = _mse_dequantize(q["idx"], q["norm"], D, bits - prod, seed)
    if prod:
        x = x + qjl_dequantize(q["sign"], q["rnorm"].float(), qjl_projection(D, D, seed + 1).to(x.device))
    return x


@dataclass
class TurboQuant(Quantizer):
    """TurboQuant-`bits` keys and values, packed: b bits per coordinate + one norm per vector (two for "prod").

    Args:
        bits: b, bits per coordinate, 1..8 (paper: 1-4 in Theorem 1; 2.5 and 3.5 effective in its KV runs).
        variant: "mse" (Algorithm 1) or "prod" (Algorithm 2, b - 1 bits + 1-bit QJL, unbiased) for the keys.
        seed: of the rotation Pi and the QJL matrix S.
    """

    bits: int = 4
    variant: str = "mse"
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"TurboQuant: bits must be an int in 1..8, got {self.bits!r}")
        if self.variant not in ("mse", "prod"):
            raise ValueError(f"TurboQuant: variant must be one of mse, prod, got {self.variant!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"TurboQuant: seed must be an int, got {self.seed!r}")

    def _encode(self, x: Tensor, prod: bool) -> dict:
        q = turboquant_quantize(x, self.bits, seed=self.seed, prod=prod, norm_dtype=x.dtype)
        out = {"idx": None if q["idx"] is None else pack(q["idx"], self.bits - prod), "norm": q["norm"],
               "D": x.shape[-1]}  # an int: not counted in nbytes
        if prod:
            out.update(sign=pack(q["sign"].to(torch.uint8), 1), rnorm=q["rnorm"])
        return out

    def _decode(self, blk: dict, dtype: torch.dtype) -> Tensor:
        D, prod = blk["D"], "sign" in blk
        q = {"idx": None if blk["idx"] is None else unpack(blk["idx"], self.bits - prod, D), "norm": blk["norm"]}
        if prod:
            q.update(sign=unpack(blk["sign"], 1, D).bool(), rnorm=blk["rnorm"])
        return turboquant_dequantize(q, D, self.bits, seed=self.seed).to(dtype)

    def encode(self, k, v, step, state) -> dict:
        return {"k": None if k is None else self._encode(k, self.variant == "prod"),
                "v": None if v is None else self._encode(v, False)}

    def decode(self, block, dtype, state) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return tuple(None if block[x] is None else self._decode(block[x], dtype) for x in ("k", "v"))

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held: per token and head, ceil(D b / 8) bytes of codes and a norm in the cache's
        dtype for values and "mse" keys; "prod" keys: ceil(D (b-1) / 8) + D / 8 bytes and two norms."""
        D, cb, b = cache.head_dim, cache.bits, self.bits
        value = 8 * math.ceil(D * b / 8) + cb
        key = value if self.variant == "mse" else 8 * math.ceil(D * (b - 1) / 8) + 8 * math.ceil(D / 8) + 2 * cb
        return 2 * D * cb / (key + value)

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["TurboQuant"]:
        """b = 8 .. 1. On the benchmark's 16-bit cache (D = 64): 1.9x, 2.2x, 2.6x, 3.1x, 3.8x, 4.9x, 7.1x, 12.8x;
        targets 2 -> 8 bits, 4 -> 4 bits, 8 -> 2 bits."""
        return [cls(bits=b) for b in range(8, 0, -1)]
