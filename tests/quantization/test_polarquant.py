"""PolarQuant (arXiv 2502.02617): Definition 1's transform and its closed-form inverse written as loops, Lemma 2's
angle densities, Algorithm 1 against a plain loop, 3.875 bits per coordinate measured, the flush rule of Section
5.3, the tiny model and composition; plus the mixed-width packing it uses (primitives.pack_fields)."""

import math

import pytest
import torch

from reference_impls import Compose, Full, KVCache, SnapKV
from reference_impls.base import Step
from reference_impls.generation import greedy_generate
from reference_impls.methods import make_method
from reference_impls.quantization.polarquant import (PolarQuant, polar_angle_pdf, polar_codebook, polar_inverse,
                                                     polar_transform, polarquant_dequantize, polarquant_quantize)
from reference_impls.quantization.primitives import pack, pack_fields, unpack_fields
from reference_impls.quantization.ratios import CacheSpec
from reference_impls.quantization.turboquant import random_rotation

from quant_checks import MODEL, drive, ids


def angles_by_definition(x, L):
    """Definition 1 as written: psi_j^(1) = atan2(x_2j, x_2j-1) in [0, 2pi); psi_j^(l) = atan(||second half of block
    j|| / ||first half||) for blocks of 2^l coordinates (0-based j here)."""
    out = []
    for level in range(1, L + 1):
        n, h = 2 ** level, 2 ** (level - 1)
        psi = []
        for j in range(len(x) // n):
            blk = x[j * n:(j + 1) * n]
            psi.append(math.atan2(float(blk[1]), float(blk[0])) % (2 * math.pi) if level == 1
                       else math.atan2(float(blk[h:].norm()), float(blk[:h].norm())))
        out.append(torch.tensor(psi))
    return out


def inverse_by_formula(radii, angles):
    """The paper's closed form: x_i = r * prod_l cos(psi^(l)_{i // 2^l}) if i falls in the first half of its level-l
    block, else sin(...), with r the radius of i's block of 2^L coordinates."""
    L = len(angles)
    D = len(radii) * 2 ** L
    x = torch.empty(D)
    for i in range(D):
        v = float(radii[i >> L])
        for level, psi in enumerate(angles, start=1):
            a = float(psi[i >> level])
            v *= math.cos(a) if i % 2 ** level < 2 ** (level - 1) else math.sin(a)
        x[i] = v
    return x


@pytest.mark.parametrize("D,L", [(16, 4), (64, 4), (64, 6), (8, 1)])
def test_polar_transform_is_definition_1_and_inverts_exactly(D, L):
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(D + L))
    r, angles = polar_transform(x, L)
    assert r.shape == (3, D >> L) and [a.shape[-1] for a in angles] == [D >> lv for lv in range(1, L + 1)]
    for row in range(3):
        ref = angles_by_definition(x[row], L)
        for a, b in zip(angles, ref):
            assert torch.allclose(a[row], b, atol=1e-5)
        assert torch.allclose(inverse_by_formula(r[row], [a[row] for a in angles]), x[row], atol=1e-5)
    assert torch.allclose(polar_inverse(r, angles), x, atol=1e-5)
    assert (angles[0] >= 0).all() and (angles[0] < 2 * math.pi).all()
    assert all(((a >= 0) & (a <= math.pi / 2)).all() for a in angles[1:])
    if L == int(math.log2(D)):
        assert torch.allclose(r[:, 0], x.norm(dim=-1), atol=1e-5)  # the final radius is ||x||


@pytest.mark.parametrize("level", [2, 3, 4, 5])
def test_lemma_2_density_normalizes_and_matches_angles_of_rotated_vectors(level):
    psi = torch.linspace(0, math.pi / 2, 100_001, dtype=torch.float64)
    f = polar_angle_pdf(psi, level)
    assert abs(torch.trapezoid(f, psi) - 1) < 1e-6
    mean, var = torch.trapezoid(f * psi, psi), torch.trapezoid(f * (psi - math.pi / 4) ** 2, psi)
    # any fixed vector, randomly rotated: its level-l angles follow f (here 400 rotations of one spiky vector)
    x = torch.zeros(64)
    x[3], x[17] = 10.0, -1.0
    rot = torch.stack([random_rotation(64, 500 + s) @ x for s in range(400)])
    emp = polar_transform(rot, level)[1][-1].flatten().double()
    assert abs(mean - math.pi / 4) < 1e-9 and abs(emp.mean() - mean) < 4 * math.sqrt(var / len(emp))
    assert abs(emp.var() / var - 1) < 0.25


@pytest.mark.parametrize("level,bits", [(2, 2), (3, 2), (4, 2), (2, 4), (4, 6)])
def test_codebooks_are_lloyd_max_fixed_points(level, bits):
    c = polar_codebook(level, bits)
    psi = torch.linspace(0, math.pi / 2, 400_001, dtype=torch.float64)
    f = polar_angle_pdf(psi, level)
    assert torch.allclose(c + c.flip(0), torch.full_like(c, math.pi / 2), atol=1e-4)  # symmetric about pi/4
    edges = torch.cat([psi[:1], (c[1:] + c[:-1]) / 2, psi[-1:]])
    for k in range(2 ** bits):
        cell = (psi >= edges[k]) & (psi <= edges[k + 1])
        assert abs(torch.trapezoid(f[cell] * psi[cell], psi[cell]) / torch.trapezoid(f[cell], psi[cell]) - c[k]) < 1e-4
    assert torch.allclose(polar_codebook(1, 4), (torch.arange(16).double() + 0.5) * math.pi / 8)  # uniform level 1


@pytest.mark.parametrize("bits,precondition", [((4, 2, 2, 2), True), ((4, 2, 2, 2), False), ((3, 1, 1, 1, 1, 1), True),
                                               ((5, 3), True)])
def test_store_decodes_exactly_algorithm_1_written_as_a_loop(bits, precondition):
    D, L = 64, len(bits)
    g = torch.Generator().manual_seed(L)
    k, v = torch.randn(1, 2, 3, D, generator=g), torch.randn(1, 2, 3, D, generator=g) * 0.1
    store = PolarQuant(bits=bits, precondition=precondition, seed=9).new_layer(0, MODEL)
    drive(store, k, v, [3])
    (k_hat,), (v_hat,) = store.decoded(torch.float32)
    P = random_rotation(D, 9) if precondition else torch.eye(D)
    for x, x_hat in ((k, k_hat), (v, v_hat)):
        for row, row_hat in zip(x.reshape(-1, D), x_hat.reshape(-1, D)):
            y = P @ row
            angles = angles_by_definition(y, L)
            q = []
            for lv, (psi, b) in enumerate(zip(angles, bits), start=1):  # Quant, then the centroid, angle by angle
                c = polar_codebook(lv, b).float()
                q.append(torch.stack([c[(c - a).abs().argmin()] for a in psi]))
            radii = torch.stack([y[i * 2 ** L:(i + 1) * 2 ** L].norm() for i in range(D >> L)])
            assert torch.allclose(row_hat, P.T @ inverse_by_formula(radii, q), atol=1e-4)


def test_bytes_measured_are_3875_bits_per_coordinate_with_the_papers_setting():
    """Section 4.1: 4 + 2 + 2 + 2 bits over 4 levels and a 16-bit radius per 16 coordinates = 62 / 16 bits."""
    B, H, T, D = 2, 3, 40, 128
    k, v = torch.randn(B, H, T, D).bfloat16(), torch.randn(B, H, T, D).bfloat16()
    method = PolarQuant()
    store = method.new_layer(0, MODEL)
    drive(store, k, v, [T])
    blk = store.blocks[0]["k"]
    assert blk["idx"].dtype == torch.uint8 and blk["idx"].shape == (B, H, T, (64 * 4 + 32 * 2 + 16 * 2 + 8 * 2) // 8)
    assert blk["radius"].shape == (B, H, T, 8) and blk["radius"].dtype == torch.bfloat16
    assert store.nbytes() * 8 / (2 * B * H * T * D) == 3.875
    assert method.nominal_ratio(CacheSpec(head_dim=D, tokens=T)) == pytest.approx(16 / 3.875)
    for bits, D in [((3, 1, 1, 1, 1, 1), 64), ((5, 3), 12), ((8, 6, 6, 6), 32)]:  # odd totals: one rounding per token
        m = PolarQuant(bits=bits)
        s = m.new_layer(0, MODEL)
        k, v = torch.randn(1, 2, 7, D).half(), torch.randn(1, 2, 7, D).half()
        drive(s, k, v, [7])
        per = math.ceil(sum((D >> lv) * b for lv, b in enumerate(bits, 1)) / 8) + (D >> len(bits)) * 2
        assert s.nbytes() == 2 * 2 * 7 * per
        assert (k.nbytes + v.nbytes) / s.nbytes() == pytest.approx(m.nominal_ratio(CacheSpec(head_dim=D, tokens=7)))


def test_preconditioning_removes_outliers():
    """Section 5.1 / Fig. 2: without the rotation, a key with an outlier channel has off-distribution angles and a
    larger error; with it, the error is that of a Gaussian vector."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 64, generator=g)
    spiky = x.clone()
    spiky[:, 5] += 30

    def err(z, pre):
        bits = (4, 2, 2, 2)
        z_hat = polarquant_dequantize(polarquant_quantize(z, bits, precondition=pre), bits, precondition=pre)
        return float(((z - z_hat) ** 2).sum() / (z ** 2).sum())

    assert err(spiky, True) < 0.5 * err(spiky, False)
    assert abs(err(spiky, True) - err(x, True)) < 0.3 * err(x, True) and err(x, True) < 0.05


def test_prompt_is_quantized_and_decoding_steps_stay_full_precision():
    """Section 5.3: the tokens generated while decoding stay in 16 bits; a later multi-token prompt part is packed."""
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    store = PolarQuant().new_layer(0, MODEL)
    drive(store, k, v, [10, 4, 1, 1, 1])
    assert (store.held_k, store.k.shape[2]) == (14, 3)  # prompt (10) + question (4) packed, 3 decoded in full
    store = PolarQuant(quantize_generated=True).new_layer(0, MODEL)
    drive(store, k, v, [10, 1, 1])
    assert (store.held_k, store.k.shape[2]) == (12, 0)


@torch.no_grad()
def test_end_to_end_on_the_tiny_model(tiny):
    x = ids(40, seed=7)
    full, pq = KVCache(tiny, Full()), KVCache(tiny, PolarQuant())
    assert torch.equal(tiny(x, cache=full).logits, tiny(x, cache=pq).logits)  # prefill reads the exact keys
    nxt = torch.tensor([[11]])
    a, b = tiny(nxt, cache=full).logits, tiny(nxt, cache=pq).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)
    gen = greedy_generate(tiny, KVCache(tiny, PolarQuant(precondition=False)), [ids(30, seed=8), ids(3, seed=9)], 5)
    assert len(gen.tokens) == 5 and gen.kv_bytes < gen.full_kv_bytes  # head dim 16: one level-4 block per head


@torch.no_grad()
def test_composes_with_snapkv(tiny):
    x = ids(120, seed=10)
    snap = KVCache(tiny, SnapKV(ratio=2, window=8))
    both = KVCache(tiny, Compose(SnapKV(ratio=2, window=8), PolarQuant()))
    tiny(x, cache=snap), tiny(x, cache=both)
    assert both.nbytes() < snap.nbytes() / 3
    assert len(greedy_generate(tiny, KVCache(tiny, make_method("snapkv:ratio=2+polarquant", 8)), [x], 4).tokens) == 4


def test_from_ratio_picks_levels_and_bits_against_a_16_bit_cache():
    # 16-bit cache, D = 64: (8,6,6,6) 2.10x, (6,4,4,4) 2.78x, (4,2,2,2) 4.13x, (3,1,1,1,1,1) 7.11x
    assert [PolarQuant.from_ratio(r).bits for r in (2, 4, 8)] == [(8, 6, 6, 6), (4, 2, 2, 2), (3, 1, 1, 1, 1, 1)]
    assert PolarQuant.from_ratio(4, precondition=False).precondition is False
    assert make_method("polarquant:bits=4-2-2-2", 2).bits == (4, 2, 2, 2)  # a method string can set the levels
    assert make_method("polarquant", 4) == PolarQuant()


def test_bad_parameters_are_rejected():
    for bad in ((), (4, 0), (9, 2), (4, 2.5), "4-x-2", 4, (1,) * 9):
        with pytest.raises(ValueError, match="bits must be"):
            PolarQuant(bits=bad)
    with pytest.raises(ValueError, match="precondition must be a bool"):
        PolarQuant(precondition="yes")
    with pytest.raises(ValueError, match="quantize_generated must be a bool"):
        PolarQuant(quantize_generated=1)
    with pytest.raises(ValueError, match="6 levels need a head dim divisible by 64, got 16"):
        store = PolarQuant(bits=(3, 1, 1, 1, 1, 1)).new_layer(0, MODEL)
        store.append(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16))
        store.after_attention(Step.dense(torch.zeros(1, 1, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)))


@pytest.mark.parametrize("bits,sizes", [([3], [11]), ([4, 2, 2, 2], [32, 16, 8, 4]), ([3, 1, 1, 7], [5, 3, 1, 2]),
                                        ([8, 1], [2, 3])])
def test_pack_fields_is_one_bit_stream_of_mixed_widths(bits, sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    codes = [torch.randint(0, 2 ** b, (2, 3, n), generator=g, dtype=torch.uint8) for b, n in zip(bits, sizes)]
    packed = pack_fields(codes, bits)
    total = sum(b * n for b, n in zip(bits, sizes))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, math.ceil(total / 8))
    assert all(torch.equal(a, b) for a, b in zip(unpack_fields(packed, bits, sizes), codes))
    # the stream, written out: each code's bits low first, fields one after the other, 8 bits per byte low first
    stream = [(int(c) >> j) & 1 for f, b in zip(codes, bits) for c in f[1, 2] for j in range(b)]
    stream += [0] * (-len(stream) % 8)
    by_hand = [sum(s << i for i, s in enumerate(stream[k:k + 8])) for k in range(0, len(stream), 8)]
    assert packed[1, 2].tolist() == by_hand
    if len(bits) == 1:
        assert torch.equal(packed, pack(codes[0], bits[0]))
    with pytest.raises(ValueError, match="one width per code tensor"):
        pack_fields(codes, bits + [1])
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        pack_fields(codes[:1], [0])
    with pytest.raises(ValueError, match="one size per width"):
        unpack_fields(packed, bits, sizes + [1])
