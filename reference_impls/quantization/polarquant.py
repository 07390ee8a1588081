"""PolarQuant: rotate each key and value vector at random, rewrite it recursively as radii and angles, quantize the
angles with fixed per-level codebooks (no scale or zero point is stored).

Paper: Han, Kacham, Karbasi, Mirrokni, Zandieh, "PolarQuant: Quantizing KV Caches with Polar Transformation",
arXiv 2502.02617: Definition 1 (recursive polar transform: level 1 pairs coordinates, psi = atan2(x_2j, x_2j-1)
in [0, 2pi); level l >= 2 pairs the radii of level l - 1, psi in [0, pi/2]), Lemma 2 (after a random rotation the
angles are independent; level 1 uniform, level l >= 2 with density ~ sin^(2^(l-1) - 1)(2 psi)), Eq. (4) (a 1-D
k-means codebook per level), Algorithm 1 (Polar, Quant, DeQuant: x = Pi^T polar^-1(r, theta[idx])), Section 4
(keys AND values are quantized, Eq. 6; one rotation shared by keys, values, layers and heads), Section 4.1
(L = 4 levels: one radius per 16 coordinates kept in 16 bits, 4 bits for level 1 and 2 for levels 2-4, i.e.
62 / 16 = 3.875 bits per coordinate), Section 5.3 (tokens generated while decoding stay in 16 bits).
Official code: none released (the paper names none).
Deviations: (1) the codebooks are the Lloyd-Max solution of Eq. (4) for the Lemma 2 densities (computed once,
level 1 in closed form: 2^b equal arcs), i.e. the paper's offline codebook without the sampling; its online
variant (k-means++ on each prompt's angles, per layer) is not implemented. (2) The rotation is a Haar matrix from
`seed` (the paper: "a random rotational matrix"), shared like a weight and not counted in nbytes; `precondition
=False` gives the paper's PolarQuant without it. (3) Radii are stored in the cache's dtype (the paper: 16 bits).
(4) Only single-token decoding steps stay in full precision (a later multi-token prompt part, e.g. a question, is
quantized like the prompt); `quantize_generated=True` quantizes them too. (5) Bit widths other than (4, 2, 2, 2)
(the rungs of `from_ratio`) are extensions. A token's codes of all levels form one packed bit stream (uint8, as the
paper packs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from reference_impls.quantization.primitives import pack_fields, unpack_fields
from reference_impls.quantization.ratios import EMBEDDED, CacheSpec
from reference_impls.quantization.store import Quantizer
from reference_impls.quantization.turboquant import lloyd_max, random_rotation

__all__ = ["PolarQuant", "polar_angle_pdf", "polar_codebook", "polar_inverse", "polar_transform",
           "polarquant_dequantize", "polarquant_quantize"]

_CODEBOOKS: dict[tuple[int, int], Tensor] = {}  # (level, bits) -> centroids


def polar_angle_pdf(psi: Tensor, level: int) -> Tensor:
    """Lemma 2: density of a level-l angle of a rotated vector. Level 1: uniform on [0, 2pi); level l >= 2:
    Gamma(2^(l-1)) / (2^(2^(l-1) - 2) Gamma(2^(l-2))^2) sin^(2^(l-1) - 1)(2 psi) on [0, pi/2]."""
    if level == 1:
        return torch.full_like(psi, 1 / (2 * math.pi))
    n = 2 ** (level - 1)
    log_c = math.lgamma(n) - (n - 2) * math.log(2) - 2 * math.lgamma(n / 2)
    return torch.exp(log_c + (n - 1) * torch.log(torch.sin(2 * psi).clamp(min=1e-300)))


def polar_codebook(level: int, bits: int) -> Tensor:
    """Eq. (4): the 2^bits centroids (fp64, ascending) of a level's angles, cached. Level 1 is uniform, whose
    Lloyd-Max quantizer is 2^bits equal arcs (centroids at their middles); levels >= 2 are solved numerically."""
    if (level, bits) not in _CODEBOOKS:
        n = 2 ** bits
        _CODEBOOKS[level, bits] = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n) if level == 1 \
            else lloyd_max(lambda p: polar_angle_pdf(p, level), 0.0, math.pi / 2, n)
    return _CODEBOOKS[level, bits]


def polar_transform(y: Tensor, levels: int) -> tuple[Tensor, list[Tensor]]:
    """Definition 1 / Algorithm 1's Polar, stopped after `levels` levels: y (..., D) -> radii (..., D / 2^L) and
    angles [psi_1 (..., D/2), ..., psi_L (..., D / 2^L)]; psi_1 in [0, 2pi), the others in [0, pi/2]."""
    r, angles = y.float(), []
    for level in range(1, levels + 1):
        a, b = r[..., 0::2], r[..., 1::2]  # (r_2j-1, r_2j) in the paper's 1-based indices
        psi = torch.atan2(b, a)
        angles.append(torch.remainder(psi, 2 * math.pi) if level == 1 else psi)  # level >= 2: a, b >= 0
        r = torch.hypot(a, b)
    return r, angles


def polar_inverse(r: Tensor, angles: list[Tensor]) -> Tensor:
    """Algorithm 1's DeQuant before the rotation: r_2j-1 = r_j cos(psi_j), r_2j = r_j sin(psi_j), level L down to 1."""
    for psi in reversed(angles):
        r = torch.stack([r * torch.cos(psi), r * torch.sin(psi)], dim=-1).flatten(-2)
    return r


def polarquant_quantize(x: Tensor, bits: tuple[int, ...], *, seed: int = 0, precondition: bool = True,
                        radius_dtype: torch.dtype = torch.float32) -> dict:
    """x (..., D) -> {"idx": [uint8 (..., D / 2^l) per level l], "radius": (..., D / 2^L) in radius_dtype}."""
    D, L = x.shape[-1], len(bits)
    if D % 2 ** L:
        raise ValueError(f"PolarQuant: {L} levels need a head dim divisible by {2 ** L}, got {D}")
    y = x.float() @ random_rotation(D, seed).to(x.device).T if precondition else x.float()  # y = Pi x
    r, angles = polar_transform(y, L)
    idx = []
    for level, (psi, b) in enumerate(zip(angles, bits), start=1):
        c = polar_codebook(level, b).float().to(x.device)
        idx.append(torch.bucketize(psi.contiguous(), (c[1:] + c[:-1]) / 2).to(torch.uint8))  # Quant: nearest centroid
    return {"idx": idx, "radius": r.to(radius_dtype)}


def polarquant_dequantize(q: dict, bits: tuple[int, ...], *, seed: int = 0, precondition: bool = True) -> Tensor:
    """Algorithm 1's DeQuant: centroids in place of the angles, inverse polar transform, x = Pi^T y -> fp32."""
    angles = [polar_codebook(level, b).float().to(i.device)[i.long()]
              for level, (i, b) in enumerate(zip(q["idx"], bits), start=1)]
    y = polar_inverse(q["radius"].float(), angles)
    return y @ random_rotation(y.shape[-1], seed).to(y.device) if precondition else y


@dataclass
class PolarQuant(Quantizer):
    """PolarQuant(-R) keys and values: per level l, D / 2^l angles of bits[l-1] bits; D / 2^L radii.

    Args:
        bits: bits of each level's angles; its length is the number of levels L (paper: (4, 2, 2, 2)). A string
            such as "4-2-2-2" is accepted (method strings cannot hold tuples).
        precondition: random rotation first (PolarQuant-R, default) or not (the paper's plain PolarQuant).
        quantize_generated: also quantize single-token decoding steps (the paper keeps them in 16 bits).
        seed: of the rotation.
    """

    bits: tuple = (4, 2, 2, 2)
    precondition: bool = True
    quantize_generated: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.bits, str) and all(b.strip().isdigit() for b in self.bits.split("-")):
            self.bits = tuple(int(b) for b in self.bits.split("-"))
        if not (isinstance(self.bits, (tuple, list)) and 1 <= len(self.bits) <= 8
                and all(isinstance(b, int) and 1 <= b <= 8 for b in self.bits)):
            raise ValueError(f"PolarQuant: bits must be 1..8 ints in 1..8 (one per level), got {self.bits!r}")
        self.bits = tuple(self.bits)
        for f in ("precondition", "quantize_generated"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"PolarQuant: {f} must be a bool, got {getattr(self, f)!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"PolarQuant: seed must be an int, got {self.seed!r}")

    def flush(self, held_k, held_v, buffered, step):
        n = buffered if step.compress or step.q_len > 1 or self.quantize_generated else 0  # Section 5.3
        return n, n

    def _encode(self, x: Tensor) -> dict:
        q = polarquant_quantize(x, self.bits, seed=self.seed, precondition=self.precondition, radius_dtype=x.dtype)
        # every level's codes of a token in one bit stream: sum_l D / 2^l * b_l bits, rounded up to bytes once
        return {"idx": pack_fields(q["idx"], list(self.bits)), "radius": q["radius"], "D": x.shape[-1]}

    def _decode(self, blk: dict, dtype: torch.dtype) -> Tensor:
        idx = unpack_fields(blk["idx"], list(self.bits), [blk["D"] >> lv for lv in range(1, len(self.bits) + 1)])
        return polarquant_dequantize({"idx": idx, "radius": blk["radius"]}, self.bits, seed=self.seed,
                                     precondition=self.precondition).to(dtype)

    def encode(self, k, v, step, state) -> dict:
        return {"k": None if k is None else self._encode(k), "v": None if v is None else self._encode(v)}

    def decode(self, block, dtype, state) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return tuple(None if block[x] is None else self._decode(block[x], dtype) for x in ("k", "v"))

    def nominal_ratio(self, cache: CacheSpec = EMBEDDED) -> float:
        """Full bytes / bytes held after the prompt: per token and head, for keys and for values, every level's
        codes in one stream (ceil(sum_l D / 2^l * b_l / 8) bytes) and D / 2^L radii in the cache's dtype."""
        D, cb = cache.head_dim, cache.bits
        per = 8 * math.ceil(sum((D >> lv) * b for lv, b in enumerate(self.bits, 1)) / 8) + (D >> len(self.bits)) * cb
        return D * cb / per

    @classmethod
    def candidates(cls, cache: CacheSpec) -> list["PolarQuant"]:
        """The paper's (4, 2, 2, 2) and rungs around it. On the benchmark's 16-bit cache (D = 64): (8, 6, 6, 6) 2.1x,
        (6, 4, 4, 4) 2.8x, (4, 2, 2, 2) 4.1x, (3, 1, 1, 1, 1, 1) 7.1x (six levels, one radius per 64 coordinates: the
        8x rung needs D divisible by 64); targets 2, 4, 8 -> the first, third and fourth."""
        return [cls(bits=b) for b in ((8, 6, 6, 6), (6, 4, 4, 4), (4, 2, 2, 2), (3, 1, 1, 1, 1, 1))]
