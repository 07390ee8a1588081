"""Quantization primitives shared by every KV-quantization method: three verbs, bit packing, a container.

    scale, zero = choose_qparams(x, bits=b, dim=d, group_size=g)     # asymmetric min-max, per group
    codes = quantize(x, scale, zero, bits=b, dim=d, group_size=g)     # uint8, 0 .. 2^b - 1, unpacked
    x_hat = dequantize(codes, scale, zero, dim=d, group_size=g, dtype=torch.float16)
    packed = pack(codes, b); codes = unpack(packed, b, n)            # a bit stream along the last dim
    packed = pack_fields([c1, c2], [b1, b2]); c1, c2 = unpack_fields(packed, [b1, b2], [n1, n2])  # mixed widths
    lo, hi = dense_range(x, frac, dim)                                # outliers: outside [lo, hi], kept exact
    rows = SparseRows(); rows.add(x, mask); x_hat = rows.put(x_hat)   # ... in a growing sparse store

A group is `group_size` consecutive elements along `dim`; the last group may be shorter. Within a group,
with qmax = 2^b - 1 (arXiv 2402.02750 Eq. 1, the asymmetric round-to-nearest of KIVI and FlexGen):

    zero  = min(x_group)                  scale = (max(x_group) - min(x_group)) / qmax
    codes = clamp(round((x - zero) / scale), 0, qmax)        x_hat = zero + scale * codes

so |x - x_hat| <= scale / 2 for every element (plus the rounding of scale/zero to their storage dtype).
`zero` is a floating-point offset (the group minimum), not an integer zero-point as in torchao.

Layout of scale/zero: x's shape with `dim` replaced by the number of groups, ceil(n / group_size). For
keys/values (B, H_kv, T, D):

    | granularity                   | dim | group_size | scale / zero shape  | used by                      |
    |-------------------------------|-----|------------|---------------------|------------------------------|
    | per-token                     | -1  | D          | (B, H_kv, T, 1)     | KIVI values, FlexGen (g = D) |
    | per-token, groups of channels | -1  | g          | (B, H_kv, T, D / g) | FlexGen, KIVI values (g < D) |
    | per-channel                   | -2  | T          | (B, H_kv, 1, D)     | KIVI keys (one group)        |
    | per-channel, groups of tokens | -2  | g          | (B, H_kv, T / g, D) | KIVI keys                    |

Scale and zero are computed in fp32 and stored in x's dtype (fp16 for an fp16 cache, as KIVI's code
does); pass `dtype=` to choose_qparams to store them otherwise. Every verb accepts any bits in 1..8; 1, 2, 4
and 8 bits put a whole number of codes in a byte, other widths straddle bytes (same bit stream).

Dense-and-sparse (KVQuant, GEAR): `dense_range` gives each vector's range once its extreme entries are
dropped; the entries outside it are outliers, stored exactly by `SparseRows` (int32 index + value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["QuantizedTensor", "SparseRows", "choose_qparams", "dense_range", "dequantize", "pack", "pack_fields",
           "quantize", "unpack", "unpack_fields"]

PACK_BITS = (1, 2, 4, 8)


def _check(x: Tensor, bits: int, dim: int, group_size: int) -> int:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, got {dim}")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    return dim % x.dim()


def _groups(x: Tensor, dim: int, group_size: int) -> Tensor:
    """(.., n, ..) -> (..others, n_groups, group_size) in fp32; a ragged last group repeats its last element."""
    g = x.float().movedim(dim, -1)
    pad = -g.shape[-1] % group_size
    if pad:  # repeating the last element keeps the ragged group's own min and max
        g = torch.cat([g, g[..., -1:].expand(*g.shape[:-1], pad)], dim=-1)
    return g.reshape(*g.shape[:-1], -1, group_size)


def _ungroup(g: Tensor, dim: int, n: int) -> Tensor:
    """Inverse of _groups: (..others, n_groups, group_size) -> (.., n, ..)."""
    return g.flatten(-2)[..., :n].movedim(-1, dim)


def choose_qparams(x: Tensor, *, bits: int, dim: int, group_size: int,
                   dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max (scale, zero) per group of `group_size` consecutive elements along `dim`.

    x (..., n, ...) -> scale, zero (..., ceil(n / group_size), ...), stored in `dtype` (default x.dtype).
    """
    dim = _check(x, bits, dim, group_size)
    g = _groups(x, dim, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / (2 ** bits - 1)
    dtype = dtype or x.dtype
    return scale.movedim(-1, dim).to(dtype).contiguous(), lo.movedim(-1, dim).to(dtype).contiguous()


def quantize(x: Tensor, scale: Tensor, zero: Tensor, *, bits: int, dim: int, group_size: int) -> Tensor:
    """Codes (uint8, same shape as x, values 0 .. 2^bits - 1) for the given per-group scale and zero."""
    dim = _check(x, bits, dim, group_size)
    s = scale.float().movedim(dim, -1)[..., None]  # (..others, n_groups, 1)
    z = zero.float().movedim(dim, -1)[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every code 0, x_hat = zero exactly
    q = ((_groups(x, dim, group_size) - z) / safe).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return _ungroup(q, dim, x.shape[dim])


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, *, dim: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = zero + scale * codes, per group, computed in fp32 and returned in `dtype`."""
    dim = _check(codes, 1, dim, group_size)
    s = scale.float().movedim(dim, -1)[..., None]
    z = zero.float().movedim(dim, -1)[..., None]
    return _ungroup(torch.addcmul(z, s, _groups(codes, dim, group_size)), dim, codes.shape[dim]).to(dtype)


def _check_pack(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8 to pack, got {bits!r}")


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2^bits) along the last dim as a little-endian bit stream: bit j of code i is bit
    i * bits + j of the stream, which fills byte 0 from its low bit, then byte 1 ...

    (..., n) -> (..., ceil(n * bits / 8)) uint8; the tail is padded with zero bits. For 1, 2, 4 and 8 bits this
    puts 8 // bits whole codes in a byte, the first in the low bits (the layout the Triton kernels read).
    """
    _check_pack(bits)
    if 8 % bits:  # 3, 5, 6, 7 bits: codes straddle bytes; spell out each code's bits and pack those 1 per bit
        stream = (codes.to(torch.uint8)[..., None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
        return pack(stream.flatten(-2), 1)
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    pad = -codes.shape[-1] % per
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    c = c << shifts  # disjoint bit fields: OR them together
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i]
    return out


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: (..., ceil(n * bits / 8)) uint8 -> (..., n) uint8 codes."""
    _check_pack(bits)
    if packed.shape[-1] * 8 < n * bits:
        raise ValueError(f"n={n} codes of {bits} bits need {-(-n * bits // 8)} bytes, got {packed.shape[-1]}")
    if 8 % bits:
        stream = unpack(packed, 1, n * bits).reshape(*packed.shape[:-1], n, bits)
        return (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)
    if bits == 8:
        return packed[..., :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & (2 ** bits - 1)  # (..., bytes, per)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def pack_fields(codes: list[Tensor], bits: list[int]) -> Tensor:
    """Several code tensors of different widths as ONE bit stream along the last dim: the codes of `codes[0]`
    (b_0 bits each), then those of `codes[1]` ... in `pack`'s little-endian layout (so pack_fields([c], [b]) ==
    pack(c, b)). [(..., n_i) uint8] -> (..., ceil(sum n_i b_i / 8)); no byte is padded between fields."""
    if len(codes) != len(bits) or not codes:
        raise ValueError(f"pack_fields needs one width per code tensor, got {len(codes)} tensors, {len(bits)} widths")
    streams = []
    for c, b in zip(codes, bits):
        _check_pack(b)
        shifts = torch.arange(b, dtype=torch.uint8, device=c.device)
        streams.append(((c.to(torch.uint8)[..., None] >> shifts) & 1).flatten(-2))  # code i -> bits i*b .. i*b+b-1
    return pack(torch.cat(streams, dim=-1), 1)


def unpack_fields(packed: Tensor, bits: list[int], sizes: list[int]) -> list[Tensor]:
    """Inverse of `pack_fields`: (..., bytes) uint8 -> [(..., sizes[i]) uint8 codes of bits[i] bits]."""
    if len(bits) != len(sizes):
        raise ValueError(f"unpack_fields needs one size per width, got {len(bits)} widths and {len(sizes)} sizes")
    for b in bits:
        _check_pack(b)
    stream = unpack(packed, 1, sum(n * b for n, b in zip(sizes, bits)))
    out, at = [], 0
    for n, b in zip(sizes, bits):
        field = stream[..., at:at + n * b].reshape(*stream.shape[:-1], n, b)
        out.append((field << torch.arange(b, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8))
        at += n * b
    return out


def dense_range(x: Tensor, frac: float, dim: int, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per vector along `dim`: (lo, hi), min and max once its ceil(frac n / 2) largest and smallest are dropped.

    Entries where `keep` is False (padding, sinks) are ignored and n counts the others; entries outside
    [lo, hi] are the vector's outliers. lo, hi: x's shape and dtype with `dim` of size 1.
    """
    keep = torch.ones_like(x, dtype=torch.bool) if keep is None else keep.expand_as(x)
    s = torch.where(keep, x.float(), float("inf")).movedim(dim, -1).sort(dim=-1).values  # kept entries first
    n = keep.movedim(dim, -1).sum(-1, keepdim=True)
    k = torch.minimum(torch.ceil(frac * n.double() / 2 - 1e-9).long(), (n - 1).clamp(min=0) // 2)
    lo, hi = s.gather(-1, k.clamp(max=s.shape[-1] - 1)), s.gather(-1, (n - 1 - k).clamp(min=0))
    lo, hi = torch.where(n > 0, lo, 0.0), torch.where(n > 0, hi, 0.0)  # nothing kept: an empty range
    return lo.movedim(-1, dim).to(x.dtype), hi.movedim(-1, dim).to(x.dtype)


class SparseRows:
    """Sparse entries of a (B, H, T, D) tensor growing along T: flat time-major indices + their values."""

    def __init__(self):
        self.idx, self.val, self.rows = torch.zeros(0, dtype=torch.int32), None, 0

    def add(self, x: Tensor, mask: Tensor) -> None:
        """Append the next q tokens' entries x[mask]; x, mask (B, H, q, D)."""
        flat, m = x.permute(2, 0, 1, 3).reshape(-1), mask.permute(2, 0, 1, 3).reshape(-1)
        i = m.nonzero().squeeze(1)
        new = i + self.rows * x[:, :, 0].numel()  # time-major: earlier tokens' indices never move
        if new.numel() and int(new.max()) >= 2 ** 31:
            self.idx = self.idx.long()
        self.idx = torch.cat([self.idx.to(x.device), new.to(self.idx.dtype)])
        self.val = flat[i] if self.val is None else torch.cat([self.val, flat[i]])
        self.rows += x.shape[2]

    def put(self, dense: Tensor, add: bool = False) -> Tensor:
        """dense (B, H, T, D) with the sparse entries written over it (or added to it)."""
        if self.val is None:
            return dense
        B, H, T, D = dense.shape
        flat = dense.permute(2, 0, 1, 3).reshape(-1)
        flat = flat.index_put((self.idx.long(),), self.val.to(dense.dtype), accumulate=add)
        return flat.reshape(T, B, H, D).permute(1, 2, 0, 3)

    def nbytes(self) -> int:
        return self.idx.nbytes + (0 if self.val is None else self.val.nbytes)


@dataclass
class QuantizedTensor:
    """A tensor held as packed codes plus per-group scale and zero (the layout of choose_qparams).

    `data` is packed along the last dim; `shape` is the original shape. `nbytes` counts every tensor held.
    """

    data: Tensor  # uint8 (..., ceil(shape[-1] * bits / 8))
    scale: Tensor  # shape with `dim` -> n_groups
    zero: Tensor
    bits: int
    dim: int
    group_size: int
    shape: tuple[int, ...]

    @classmethod
    def from_float(cls, x: Tensor, *, bits: int, dim: int, group_size: int,
                   dtype: Optional[torch.dtype] = None) -> "QuantizedTensor":
        """choose_qparams -> quantize -> pack, in one call; `dtype` is the storage dtype of scale/zero."""
        scale, zero = choose_qparams(x, bits=bits, dim=dim, group_size=group_size, dtype=dtype)
        codes = quantize(x, scale, zero, bits=bits, dim=dim, group_size=group_size)
        return cls(pack(codes, bits), scale, zero, bits, dim % x.dim(), group_size, tuple(x.shape))

    def codes(self) -> Tensor:
        return unpack(self.data, self.bits, self.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes(), self.scale, self.zero, dim=self.dim, group_size=self.group_size, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes + self.zero.nbytes

    def cat(self, other: "QuantizedTensor", dim: int) -> "QuantizedTensor":
        """Concatenate along `dim` (not the packed last dim). Along the group dim, self must end on a group edge."""
        dim = dim % len(self.shape)
        same = ("bits", "dim", "group_size")
        if any(getattr(self, a) != getattr(other, a) for a in same):
            raise ValueError(f"cat needs equal {same}, got {[getattr(self, a) for a in same]} and "
                             f"{[getattr(other, a) for a in same]}")
        if dim == len(self.shape) - 1:
            raise ValueError("cat along the packed last dim is not supported")
        if dim == self.dim and self.shape[dim] % self.group_size:
            raise ValueError(f"cat along the group dim needs whole groups: {self.shape[dim]} % {self.group_size} != 0")
        shape = list(self.shape)
        shape[dim] += other.shape[dim]
        return QuantizedTensor(torch.cat([self.data, other.data], dim), torch.cat([self.scale, other.scale], dim),
                               torch.cat([self.zero, other.zero], dim), self.bits, self.dim, self.group_size,
                               tuple(shape))
