"""KIVI Triton kernels == the PyTorch reference (CPU: TRITON_INTERPRET=1, set in conftest before triton imports)."""

import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy (pip install numpy)")
pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.7.1); kernels not tested")

from reference_impls.quantization.kivi import kivi_quantize  # noqa: E402
from reference_impls.quantization.kivi_triton import (kivi_decode_attention, kivi_decode_reference,  # noqa: E402
                                                      quantize_pack)
from reference_impls.quantization.primitives import QuantizedTensor  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# output tolerance per dtype: the kernel and the reference both accumulate in fp32 and round once to the dtype
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
SIZES = [pytest.param(T, D, dt, id=f"T{T}-D{D}-{str(dt)[6:]}") for T in (1, 7, 1000, 4099) for D in (64, 128)
         for dt in DTYPES]


def rand(*shape, dtype, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 8  # an outlier channel, as keys have
    return x.to(dtype)


@pytest.mark.parametrize("T,D,dtype", SIZES)
def test_quantize_pack_is_bit_exact(T, D, dtype):
    bits = 2 if (T + D) % 2 else 4  # alternate widths over the grid to keep the interpreter quick
    x = rand(1, 2, T, D, dtype=dtype, seed=T + D)
    for keys, dim in ((True, 2), (False, 3)):
        got = quantize_pack(x, bits=bits, group_size=32, keys=keys)
        ref = QuantizedTensor.from_float(x, bits=bits, dim=dim, group_size=32)
        assert torch.equal(got.data, ref.data), (keys, bits)
        assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
        assert got.shape == ref.shape and got.nbytes == ref.nbytes


@pytest.mark.parametrize("bits", [1, 8])
def test_quantize_pack_other_widths(bits):
    x = rand(2, 1, 37, 64, dtype=torch.float16, seed=bits)
    for keys, dim in ((True, 2), (False, 3)):
        got, ref = quantize_pack(x, bits=bits, group_size=16, keys=keys), QuantizedTensor.from_float(
            x, bits=bits, dim=dim, group_size=16)
        assert torch.equal(got.data, ref.data) and torch.equal(got.scale, ref.scale)


@pytest.mark.parametrize("T,D,dtype", SIZES)
def test_decode_attention_equals_reference(T, D, dtype):
    bits = 4 if (T + D) % 2 else 2
    k, v = rand(1, 2, T, D, dtype=dtype, seed=T), rand(1, 2, T, D, dtype=dtype, seed=T + 1)
    q = rand(1, 6, 1, D, dtype=dtype, seed=T + 2)  # GQA: 3 query heads per KV head
    kq, kf, vq, vf = kivi_quantize(k, v, bits=bits, group_size=32, residual_length=128)
    out = kivi_decode_attention(q, kq, kf, vq, vf, D ** -0.5)
    ref = kivi_decode_reference(q, kq, kf, vq, vf, D ** -0.5)
    assert out.dtype == dtype and out.shape == (1, 6, 1, D)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_split_decoding_and_batches_equal_reference():
    T, D = 1000, 64
    k, v = rand(3, 2, T, D, dtype=torch.float32, seed=1), rand(3, 2, T, D, dtype=torch.float32, seed=2)
    q = rand(3, 4, 1, D, dtype=torch.float32, seed=3)
    kq, kf, vq, vf = kivi_quantize(k, v, bits=2, group_size=32, residual_length=128)
    ref = kivi_decode_reference(q, kq, kf, vq, vf, 0.125)
    for splits in (2, 5):  # partial softmax per split, combined on the host (flash-decoding)
        torch.testing.assert_close(kivi_decode_attention(q, kq, kf, vq, vf, 0.125, n_splits=splits), ref,
                                   atol=2e-5, rtol=1e-5)


def test_unsupported_layouts_are_rejected():
    with pytest.raises(ValueError, match="head dim"):
        quantize_pack(torch.randn(1, 1, 8, 80), bits=2, group_size=16, keys=True)
    with pytest.raises(ValueError, match="group_size"):
        quantize_pack(torch.randn(1, 1, 8, 64), bits=2, group_size=24, keys=True)
    k = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="q must be"):
        kivi_decode_attention(torch.randn(1, 3, 1, 64), None, k, None, k, 0.125)
