"""Benchmark the KIVI Triton kernels on a GPU: achieved GB/s against a bytes model, and speed vs fp16 SDPA decoding.

    python scripts/bench_kivi_triton.py                      # batch 8, 32k tokens, 32 query / 8 KV heads, D=128
    python scripts/bench_kivi_triton.py --heads 9 --kv-heads 3 --head-dim 64   # SmolLM2's attention shape

Bytes model of one decode step (what the kernel must read; q and the output are negligible), per (batch, KV head):
    packed codes     2 * TQ * D * bits / 8            (keys and values; TQ = quantized tokens)
    key scale+zero   2 * ceil(TQk / G) * D * s        (s = bytes of the scale dtype, 2 for fp16)
    value scale+zero 2 * TQv * (D / G) * s
    residual         (T - TQk + T - TQv) * D * 2      (full-precision keys and values, fp16)
and for fp16 SDPA: 2 * T * D * 2. GB/s = bytes / median time (triton.testing.do_bench).
The speed ratio is fp16 SDPA time / KIVI kernel time at the same shape. Needs CUDA: without a GPU it refuses.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_kivi_triton: no CUDA device; the GB/s and speed figures need a GPU and are not measured "
              "on CPU (the Triton interpreter checks correctness only; see tests/quantization/test_kivi_triton.py).",
              file=sys.stderr)
        return 2
    import torch.nn.functional as F
    from triton.testing import do_bench

    from reference_impls.quantization.kivi import kivi_split
    from reference_impls.quantization.kivi_triton import kivi_decode_attention, kivi_decode_reference, quantize_pack

    B, T, H, Hkv, D, G, R = (args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim, args.group_size,
                             args.residual)
    dev, dt = "cuda", torch.float16
    torch.manual_seed(0)
    k, v = torch.randn(B, Hkv, T, D, device=dev, dtype=dt), torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    scaling = D ** -0.5
    print(f"{torch.cuda.get_device_name()}: batch {B}, {T} tokens, {H}/{Hkv} heads, D={D}, G={G}, R={R}, fp16")

    ms_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True))
    bytes_sdpa = 2 * B * Hkv * T * D * 2
    print(f"fp16 SDPA decode: {ms_sdpa * 1e3:8.1f} us  {bytes_sdpa / ms_sdpa / 1e6:7.1f} GB/s  ({bytes_sdpa / 1e6:.1f} MB)")
    for bits in args.bits:
        nk, nv = kivi_split(T, group_size=G, residual_length=R)
        kq = quantize_pack(k[:, :, :nk], bits=bits, group_size=G, keys=True)
        vq = quantize_pack(v[:, :, :nv], bits=bits, group_size=G, keys=False)
        kf, vf = k[:, :, nk:], v[:, :, nv:]
        gv = vq.group_size
        model = B * Hkv * (nk * D * bits // 8 + nv * D * bits // 8 + 2 * -(-nk // G) * D * 2 + 2 * nv * (D // gv) * 2
                           + ((T - nk) + (T - nv)) * D * 2)
        out = kivi_decode_attention(q, kq, kf, vq, vf, scaling)
        err = (out.float() - kivi_decode_reference(q, kq, kf, vq, vf, scaling).float()).abs().max().item()
        ms = do_bench(lambda: kivi_decode_attention(q, kq, kf, vq, vf, scaling))
        ms_q = do_bench(lambda: quantize_pack(k, bits=bits, group_size=G, keys=True))
        q_bytes = B * Hkv * T * D * (2 + bits / 8) + 2 * B * Hkv * -(-T // G) * D * 2
        print(f"KIVI-{bits} decode:    {ms * 1e3:8.1f} us  {model / ms / 1e6:7.1f} GB/s  ({model / 1e6:.1f} MB)  "
              f"speed vs fp16 SDPA {ms_sdpa / ms:5.2f}x  max|err| vs torch {err:.2e}")
        print(f"KIVI-{bits} quantize+pack keys: {ms_q * 1e3:8.1f} us  {q_bytes / ms_q / 1e6:7.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
