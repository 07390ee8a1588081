"""Quantization primitives: round trip within half a step, bit-exact packing, the layout table."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impls.quantization.primitives import (QuantizedTensor, SparseRows, choose_qparams, dequantize, pack,
                                                     quantize, unpack)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 70), group=st.integers(1, 80), dim=st.sampled_from([-1, -2, 0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_round_trip_error_is_within_half_a_step(bits, n, group, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = [3, 5, 4]
    shape[dim] = n
    x = (torch.randn(shape, generator=gen) * torch.rand(1, generator=gen) * 10).to(dtype)
    scale, zero = choose_qparams(x, bits=bits, dim=dim, group_size=group)
    codes = quantize(x, scale, zero, bits=bits, dim=dim, group_size=group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    x_hat = dequantize(codes, scale, zero, dim=dim, group_size=group, dtype=torch.float32)
    # independent per-group reference of the step: the range of each group of `group` consecutive elements
    xm = x.float().movedim(dim, -1)
    step = torch.empty_like(xm)
    for start in range(0, n, group):
        blk = xm[..., start:start + group]
        step[..., start:start + group] = (blk.amax(-1, keepdim=True) - blk.amin(-1, keepdim=True)) / (2 ** bits - 1)
    err = (x_hat - x.float()).movedim(dim, -1).abs()
    # storage rounding of scale and zero (x's dtype) adds a few ulps of the group's magnitude
    ulp = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    tol = step / 2 * (1 + ulp) + ulp * xm.abs().amax(-1, keepdim=True) * 2 + 1e-6
    assert bool((err <= tol).all()), float((err - tol).max())


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 67), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_is_bit_exact_for_every_width_and_odd_length(bits, n, rows, seed):
    codes = torch.randint(0, 2 ** bits, (rows, 2, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 2, -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), codes)
    # independent reference: the little-endian bit stream, bit j of code i at stream position i * bits + j
    stream = [(int(c) >> j) & 1 for c in codes[0, 0] for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    assert packed[0, 0].tolist() == [sum(b << i for i, b in enumerate(stream[k:k + 8])) for k in range(0, len(stream), 8)]


def test_pack_layout_first_code_in_low_bits():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)  # 2-bit: 0b00_11_10_01 = 57, then 0b11 = 3
    assert pack(codes, 2).tolist() == [[57, 3]]
    assert pack(torch.tensor([[0xA, 0x5, 0xF]], dtype=torch.uint8), 4).tolist() == [[0x5A, 0x0F]]


@pytest.mark.parametrize("dim,group,shape", [(-1, 64, (2, 3, 10, 1)), (-1, 32, (2, 3, 10, 2)),
                                             (-2, 10, (2, 3, 1, 64)), (-2, 4, (2, 3, 3, 64))])
def test_layout_table_rows(dim, group, shape):
    x = torch.randn(2, 3, 10, 64)
    scale, zero = choose_qparams(x, bits=4, dim=dim, group_size=group)
    assert scale.shape == zero.shape == shape


def test_per_token_matches_plain_formula():
    x = torch.randn(2, 3, 10, 64)
    scale, zero = choose_qparams(x, bits=2, dim=-1, group_size=64)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    assert torch.allclose(zero, lo) and torch.allclose(scale, (hi - lo) / 3)
    codes = quantize(x, scale, zero, bits=2, dim=-1, group_size=64)
    assert torch.equal(codes, ((x - lo) / ((hi - lo) / 3)).round().clamp(0, 3).to(torch.uint8))


def test_constant_group_is_exact_and_nbytes_counts_everything():
    x = torch.full((1, 2, 8, 16), 0.75, dtype=torch.float16)
    q = QuantizedTensor.from_float(x, bits=4, dim=-2, group_size=4)
    assert torch.equal(q.dequantize(torch.float16), x)
    assert q.nbytes == 1 * 2 * 8 * 8 + 2 * (1 * 2 * 2 * 16 * 2)  # codes (2 per byte) + fp16 scale and zero


def test_cat_along_tokens_equals_quantizing_the_parts():
    a, b = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 5, 16)
    qa = QuantizedTensor.from_float(a, bits=2, dim=-2, group_size=4)
    qb = QuantizedTensor.from_float(b, bits=2, dim=-2, group_size=4)
    both = qa.cat(qb, dim=2)
    assert both.shape == (1, 2, 13, 16)
    assert torch.equal(both.dequantize(), torch.cat([qa.dequantize(), qb.dequantize()], 2))
    with pytest.raises(ValueError, match="whole groups"):
        qb.cat(qa, dim=2)


def test_bad_arguments_are_rejected():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        choose_qparams(x, bits=0, dim=-1, group_size=8)
    with pytest.raises(ValueError, match="group_size"):
        choose_qparams(x, bits=4, dim=-1, group_size=0)
    with pytest.raises(ValueError, match="dim"):
        quantize(x, x, x, bits=4, dim=2, group_size=8)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 6)  # 18 bits need 3 bytes
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5)


def test_any_width_round_trips_through_quantized_tensor():
    x = torch.randn(2, 3, 9, 20)
    for bits in (3, 5, 6, 7):
        q = QuantizedTensor.from_float(x, bits=bits, dim=-1, group_size=8)
        assert q.data.shape == (2, 3, 9, -(-20 * bits // 8))
        ref = dequantize(quantize(x, *choose_qparams(x, bits=bits, dim=-1, group_size=8), bits=bits, dim=-1,
                                  group_size=8), *choose_qparams(x, bits=bits, dim=-1, group_size=8), dim=-1,
                         group_size=8)
        assert torch.equal(q.dequantize(), ref)


def test_sparse_rows_write_and_add_entries_at_their_places_as_tokens_arrive():
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(2, 3, 7, 5, generator=g), torch.rand(2, 3, 7, 5, generator=g) < 0.2
    rows = SparseRows()
    rows.add(x[:, :, :4], mask[:, :, :4])
    rows.add(x[:, :, 4:], mask[:, :, 4:])  # a later chunk: earlier indices stay valid
    base = torch.randn(2, 3, 7, 5, generator=g)
    assert torch.equal(rows.put(base), torch.where(mask, x, base))
    assert torch.allclose(rows.put(base, add=True), torch.where(mask, x + base, base))
    assert rows.nbytes() == int(mask.sum()) * (4 + 4)  # int32 index + fp32 value
    assert torch.equal(SparseRows().put(base), base)
