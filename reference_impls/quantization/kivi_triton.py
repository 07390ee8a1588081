"""KIVI in Triton: a quantize-and-pack kernel and a fused decode-attention kernel over the packed cache.

The PyTorch reference is `kivi.py` (`kivi_quantize`, `QuantizedTensor`); these kernels produce and read the very
same layout: codes packed along D (8 / bits per byte, first code in the low bits), fp16/bf16/fp32 scale and
zero, keys grouped per channel along tokens, values per token along channels, a full-precision residual.

    data, scale, zero = quantize_pack(x, bits=2, group_size=32, keys=True)     # == QuantizedTensor.from_float
    out = kivi_decode_attention(q, kq, k_full, vq, v_full, scaling)            # == softmax(q K^T) V, de-quantized

Paper: Liu et al., "KIVI", arXiv 2402.02750, Section 3.4 (fused de-quantization with matrix multiplication).
Official code: https://github.com/jy-yuan/KIVI (`quant/new_pack.py`: a min-max kernel, then torch, then a pack
kernel; `quant/csrc/gemv_cuda.cu`: q x packed K, p x packed V).
Deviations: (1) one kernel computes min/max, scale/zero, codes and packing (the official code takes three steps);
(2) decoding is split along T (flash-decoding: partial softmax per split, combined in torch) and K and V are
de-quantized in registers and multiplied with tl.dot, where the official kernel is a CUDA gemv over int32 words;
(3) no padding mask: every row of the batch holds T real tokens.

Interpreter notes (TRITON_INTERPRET=1, CPU): set it before importing triton (tests/quantization/conftest.py does);
dots run in fp32 (bf16 tl.dot is wrong under the interpreter); bf16 rounding of scales is done with integer ops
(the interpreter's fp32 -> bf16 cast can be 1 ulp off); blocks are big because each program costs milliseconds.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from reference_impls.quantization.primitives import QuantizedTensor

__all__ = ["kivi_decode_attention", "kivi_decode_reference", "quantize_pack", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _to_storage(x, OUT_KIND: tl.constexpr):
    """Round fp32 to the storage dtype (round to nearest even) and back to fp32, as torch's .to() does."""
    if OUT_KIND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif OUT_KIND == 2:  # bf16 = the top 16 bits of fp32, rounded to nearest even with integer ops
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _quantize_pack_kernel(
    x_ptr, data_ptr, scale_ptr, zero_ptr,
    T, stride_xr, stride_xt,  # x viewed as (R = B * H_kv, T, D), unit stride along D
    N_SROWS,  # rows of scale/zero per (b, h): cdiv(T, G) for keys, T for values
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, KEYS: tl.constexpr, OUT_KIND: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    QMAX: tl.constexpr = 2 ** BITS - 1
    PER: tl.constexpr = 8 // BITS  # codes per byte
    r = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    offs_d = tl.arange(0, D)  # (D,)
    valid = (offs_t[:, None] < T) & (offs_d[None, :] < D)  # (BLOCK_T, D)
    x = tl.load(x_ptr + r * stride_xr + offs_t[:, None] * stride_xt + offs_d[None, :], mask=valid, other=0.0)
    x = x.to(tl.float32)
    if KEYS:  # per channel: groups of G consecutive tokens -> (BLOCK_T // G, G, D), reduce over the G tokens
        xg = tl.reshape(x, (BLOCK_T // G, G, D))
        vg = tl.reshape(valid, (BLOCK_T // G, G, D))
        lo = tl.min(tl.where(vg, xg, float("inf")), axis=1, keep_dims=True)
        hi = tl.max(tl.where(vg, xg, float("-inf")), axis=1, keep_dims=True)
        empty = hi < lo  # a group wholly past T (never stored): keep its numbers finite
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
    else:  # per token: groups of G consecutive channels -> (BLOCK_T, D // G, G), reduce over the G channels
        xg = tl.reshape(x, (BLOCK_T, D // G, G))
        lo = tl.min(xg, axis=2, keep_dims=True)
        hi = tl.max(xg, axis=2, keep_dims=True)
    # Eq. (1): the stored (rounded) scale and zero are the ones the codes are computed with, as in the reference
    scale = _to_storage((hi - lo) / QMAX, OUT_KIND)
    zero = _to_storage(lo, OUT_KIND)
    safe = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(xg - zero, safe)  # IEEE division on GPU too (plain '/' may be approximate)
    fl = tl.floor(y)  # round half to even, as torch.round
    frac = y - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    y = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    codes = tl.reshape(tl.minimum(tl.maximum(y, 0.0), QMAX), (BLOCK_T, D)).to(tl.int32)
    # pack PER consecutive codes of a row into one byte, first code in the low bits
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(tl.reshape(codes, (BLOCK_T, D // PER, PER)) << shifts[None, None, :], axis=2)
    offs_b = tl.arange(0, D // PER)
    tl.store(data_ptr + r * T * (D // PER) + offs_t[:, None] * (D // PER) + offs_b[None, :], packed.to(tl.uint8),
             mask=offs_t[:, None] < T)
    if KEYS:  # scale/zero (R, cdiv(T, G), D)
        rows = tl.program_id(1) * (BLOCK_T // G) + tl.arange(0, BLOCK_T // G)
        offs = r * N_SROWS * D + rows[:, None] * D + offs_d[None, :]
        m = rows[:, None] < N_SROWS
        tl.store(scale_ptr + offs, tl.reshape(scale, (BLOCK_T // G, D)).to(scale_ptr.dtype.element_ty), mask=m)
        tl.store(zero_ptr + offs, tl.reshape(zero, (BLOCK_T // G, D)).to(zero_ptr.dtype.element_ty), mask=m)
    else:  # scale/zero (R, T, D // G)
        offs_g = tl.arange(0, D // G)
        offs = r * N_SROWS * (D // G) + offs_t[:, None] * (D // G) + offs_g[None, :]
        m = offs_t[:, None] < T
        tl.store(scale_ptr + offs, tl.reshape(scale, (BLOCK_T, D // G)).to(scale_ptr.dtype.element_ty), mask=m)
        tl.store(zero_ptr + offs, tl.reshape(zero, (BLOCK_T, D // G)).to(zero_ptr.dtype.element_ty), mask=m)


def _check_layout(D: int, bits: int, group_size: int, keys: bool) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be one of 1, 2, 4, 8, got {bits}")
    if D & (D - 1) or D < 8:
        raise ValueError(f"the Triton path needs a power-of-two head dim >= 8, got D={D}")
    g = group_size if keys else min(group_size, D)
    if g & (g - 1):
        raise ValueError(f"the Triton path needs a power-of-two group_size, got {group_size}")
    return g


def quantize_pack(x: Tensor, *, bits: int, group_size: int, keys: bool) -> QuantizedTensor:
    """x (B, H_kv, T, D) -> QuantizedTensor, bit-identical to `QuantizedTensor.from_float` with dim=2 (keys,
    groups of G tokens per channel) or dim=3 (values, groups of min(G, D) channels per token)."""
    B, H, T, D = x.shape
    g = _check_layout(D, bits, group_size, keys)
    x3 = x.reshape(B * H, T, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    n_srows = triton.cdiv(T, g) if keys else T
    s_shape = (B, H, n_srows, D) if keys else (B, H, T, D // g)
    data = torch.empty(B, H, T, D * bits // 8, dtype=torch.uint8, device=x.device)
    scale, zero = torch.empty(s_shape, dtype=x.dtype, device=x.device), torch.empty(s_shape, dtype=x.dtype, device=x.device)
    # big blocks: the interpreter pays per program; on GPU ~64 rows x D per program
    block_t = max(g if keys else 1, min(triton.next_power_of_2(max(T, 1)), 512 if INTERPRET else 64))
    grid = (B * H, triton.cdiv(T, block_t))
    _quantize_pack_kernel[grid](x3, data, scale, zero, T, x3.stride(0), x3.stride(1), n_srows, D=D, BITS=bits, G=g,
                                KEYS=keys, OUT_KIND=_OUT_KIND[x.dtype], BLOCK_T=block_t)
    return QuantizedTensor(data, scale, zero, bits, 2 if keys else 3, g, (B, H, T, D))


@triton.jit
def _kivi_decode_kernel(
    q_ptr,  # (B, H, D) contiguous: one query token per row
    kq_ptr, ks_ptr, kz_ptr,  # packed keys (B, H_kv, TKQ, D // PER) u8; scale/zero (B, H_kv, cdiv(TKQ, G), D)
    kf_ptr, s_kf_b, s_kf_h, s_kf_t,  # full-precision keys (B, H_kv, T - TKQ, D), unit stride along D
    vq_ptr, vs_ptr, vz_ptr,  # packed values (B, H_kv, TVQ, D // PER) u8; scale/zero (B, H_kv, TVQ, D // GV)
    vf_ptr, s_vf_b, s_vf_h, s_vf_t,  # full-precision values (B, H_kv, T - TVQ, D)
    o_ptr, m_ptr, l_ptr,  # partials: acc (B, H, S, D) fp32, running max and sum (B, H, S) fp32 (log2 domain)
    T, TKQ, TVQ, N_KG, H_KV, N_SPLITS, SPLIT_LEN, qk_scale,  # N_KG = cdiv(TKQ, G) key-group rows
    GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = 2 ** BITS - 1
    pid = tl.program_id(0)  # one (b, kv head), all GQ query heads of its group (GQA)
    split = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    offs_m = tl.arange(0, BLOCK_M)  # query heads of the group, padded to >= 16 for tl.dot
    offs_d = tl.arange(0, D)
    m_ok = offs_m < GQ
    q_rows = b * H_KV * GQ + hk * GQ + offs_m  # (BLOCK_M,) row of (B * H)
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale  # softmax scale * log2(e): exp2 below
    byte_d = offs_d // PER  # byte of each channel's code, and its shift inside the byte
    shift_d = (offs_d % PER) * BITS
    bh = b * H_KV + hk
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, T)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token index in the stream
        live = t < end
        # keys: quantized part (per channel, group of G tokens) or the full-precision residual
        kq_m = live & (t < TKQ)
        byte = tl.load(kq_ptr + bh * TKQ * (D // PER) + t[:, None] * (D // PER) + byte_d[None, :],
                       mask=kq_m[:, None], other=0)
        codes = ((byte.to(tl.int32) >> shift_d[None, :]) & MASK).to(tl.float32)
        srow = bh * N_KG * D + (t // G)[:, None] * D + offs_d[None, :]
        ks = tl.load(ks_ptr + srow, mask=kq_m[:, None], other=0.0).to(tl.float32)
        kz = tl.load(kz_ptr + srow, mask=kq_m[:, None], other=0.0).to(tl.float32)
        kf_m = live & (t >= TKQ)
        kf = tl.load(kf_ptr + b * s_kf_b + hk * s_kf_h + (t - TKQ)[:, None] * s_kf_t + offs_d[None, :],
                     mask=kf_m[:, None], other=0.0).to(tl.float32)
        k = tl.where(kq_m[:, None], kz + ks * codes, kf)  # (BLOCK_N, D), de-quantized in registers
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # values: quantized part (per token, groups of GV channels) or the full-precision residual
        vq_m = live & (t < TVQ)
        byte = tl.load(vq_ptr + bh * TVQ * (D // PER) + t[:, None] * (D // PER) + byte_d[None, :],
                       mask=vq_m[:, None], other=0)
        codes = ((byte.to(tl.int32) >> shift_d[None, :]) & MASK).to(tl.float32)
        srow = bh * TVQ * (D // GV) + t[:, None] * (D // GV) + (offs_d // GV)[None, :]
        vs = tl.load(vs_ptr + srow, mask=vq_m[:, None], other=0.0).to(tl.float32)
        vz = tl.load(vz_ptr + srow, mask=vq_m[:, None], other=0.0).to(tl.float32)
        vf_m = live & (t >= TVQ)
        vf = tl.load(vf_ptr + b * s_vf_b + hk * s_vf_h + (t - TVQ)[:, None] * s_vf_t + offs_d[None, :],
                     mask=vf_m[:, None], other=0.0).to(tl.float32)
        v = tl.where(vq_m[:, None], vz + vs * codes, vf)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = (q_rows * N_SPLITS + split)  # (BLOCK_M,) row of the partials
    tl.store(o_ptr + out[:, None] * D + offs_d[None, :], acc, mask=m_ok[:, None])
    tl.store(m_ptr + out, m_i, mask=m_ok)
    tl.store(l_ptr + out, l_i, mask=m_ok)


def _empty_q(B: int, H: int, D: int, bits: int, g: int, keys: bool, like: Tensor) -> QuantizedTensor:
    s = (B, H, 0, D) if keys else (B, H, 0, D // g)
    return QuantizedTensor(torch.empty(B, H, 0, D * bits // 8, dtype=torch.uint8, device=like.device),
                           like.new_empty(s), like.new_empty(s), bits, 2 if keys else 3, g, (B, H, 0, D))


def kivi_decode_attention(q: Tensor, kq: Optional[QuantizedTensor], k_full: Tensor, vq: Optional[QuantizedTensor],
                          v_full: Tensor, scaling: float, *, n_splits: Optional[int] = None,
                          block_n: Optional[int] = None) -> Tensor:
    """One decode step over a KIVI cache: q (B, H, 1, D) -> (B, H, 1, D) in q's dtype.

    kq/vq: the packed keys/values (KIVI layout; None when nothing is quantized yet); k_full/v_full (B, H_kv, ., D):
    the full-precision residuals; the cache holds T = kq tokens + k_full tokens = vq tokens + v_full tokens.
    """
    B, H, one, D = q.shape
    H_kv = k_full.shape[1]
    if one != 1 or H % H_kv:
        raise ValueError(f"q must be (B, H, 1, D) with H a multiple of H_kv={H_kv}, got {tuple(q.shape)}")
    src = kq if kq is not None else vq
    bits = src.bits if src is not None else 8
    kq = kq if kq is not None else _empty_q(B, H_kv, D, bits, 1, True, k_full)
    vq = vq if vq is not None else _empty_q(B, H_kv, D, bits, D, False, v_full)
    if kq.bits != vq.bits:
        raise ValueError(f"keys and values must share bits, got {kq.bits} and {vq.bits}")
    TKQ, TVQ = kq.shape[2], vq.shape[2]
    T = TKQ + k_full.shape[2]
    if TVQ + v_full.shape[2] != T:
        raise ValueError(f"keys hold {T} tokens but values {TVQ + v_full.shape[2]}")
    G, GV = kq.group_size, vq.group_size
    if D & (D - 1) or (GV & (GV - 1)) or D % GV:
        raise ValueError(f"the Triton path needs power-of-two D and value groups dividing D, got D={D}, G={GV}")
    kq, vq = (QuantizedTensor(t.data.contiguous(), t.scale.contiguous(), t.zero.contiguous(), t.bits, t.dim,
                              t.group_size, t.shape) for t in (kq, vq))
    kf = k_full if k_full.stride(-1) == 1 else k_full.contiguous()
    vf = v_full if v_full.stride(-1) == 1 else v_full.contiguous()
    if kf.shape[2] == 0:  # triton wants a real pointer even when nothing is read from it
        kf = k_full.new_zeros(B, H_kv, 1, D)
    if vf.shape[2] == 0:
        vf = v_full.new_zeros(B, H_kv, 1, D)
    block_n = block_n or (256 if INTERPRET else 64)
    if n_splits is None:  # enough programs to fill a GPU (~2 per SM of a 132-SM part); one split on the CPU
        n_splits = 1 if INTERPRET else max(1, min(triton.cdiv(T, block_n), triton.cdiv(264, B * H_kv)))
    split_len = triton.cdiv(triton.cdiv(T, n_splits), block_n) * block_n
    n_splits = triton.cdiv(T, split_len)
    acc = torch.empty(B * H, n_splits, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B * H, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    GQ = H // H_kv
    _kivi_decode_kernel[(B * H_kv, n_splits)](
        q.reshape(B * H, D).contiguous(), kq.data, kq.scale, kq.zero, kf, kf.stride(0), kf.stride(1), kf.stride(2),
        vq.data, vq.scale, vq.zero, vf, vf.stride(0), vf.stride(1), vf.stride(2), acc, m, l,
        T, TKQ, TVQ, kq.scale.shape[2], H_kv, n_splits, split_len, scaling * math.log2(math.e),
        GQ=GQ, D=D, BITS=kq.bits, G=G, GV=GV, BLOCK_M=max(16, triton.next_power_of_2(GQ)), BLOCK_N=block_n)
    # combine the splits (flash-decoding): rescale each partial to the global max
    w = torch.exp2(m - m.amax(dim=1, keepdim=True))  # (B*H, S)
    out = (acc * w[..., None]).sum(1) / (l * w).sum(1, keepdim=True)
    return out.reshape(B, H, 1, D).to(q.dtype)


def kivi_decode_reference(q: Tensor, kq: Optional[QuantizedTensor], k_full: Tensor, vq: Optional[QuantizedTensor],
                          v_full: Tensor, scaling: float) -> Tensor:
    """The slow PyTorch path: de-quantize, concatenate, softmax(q K^T * scaling) V in fp32 (GQA by repetition)."""
    k = k_full.float() if kq is None else torch.cat([kq.dequantize(torch.float32), k_full.float()], dim=2)
    v = v_full.float() if vq is None else torch.cat([vq.dequantize(torch.float32), v_full.float()], dim=2)
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    p = torch.softmax(q.float() @ k.transpose(-1, -2) * scaling, dim=-1)
    return (p @ v).to(q.dtype)
