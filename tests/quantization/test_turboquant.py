"""TurboQuant (arXiv 2504.19874): Haar rotation, Lloyd-Max codebooks of the Lemma 1 density, Algorithms 1 and 2
checked against plain loops, the paper's distortion numbers, packed bytes, the tiny model and composition."""

import math

import pytest
import torch

from reference_impls import Compose, Full, KVCache, SnapKV
from reference_impls.base import Model, Step
from reference_impls.generation import greedy_generate
from reference_impls.methods import make_method
from reference_impls.quantization.ratios import CacheSpec
from reference_impls.quantization.turboquant import (TurboQuant, beta_pdf, random_rotation, turboquant_codebook,
                                                     turboquant_dequantize, turboquant_quantize)

from quant_checks import MODEL, drive, ids

PAPER_DMSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}  # Theorem 1, unit vectors
PAPER_DPROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}  # Theorem 2, times ||y||^2 / d


def bound_mse(b):
    return math.sqrt(3) * math.pi / 2 * 4.0 ** -b


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def test_rotation_is_orthogonal_deterministic_and_changes_with_the_seed():
    for d in (16, 64):
        P = random_rotation(d, 3).double()
        assert torch.allclose(P @ P.T, torch.eye(d, dtype=torch.float64), atol=1e-5)
        assert torch.equal(random_rotation(d, 3), P.float()) and not torch.allclose(random_rotation(d, 4), P.float())
    # Haar: a fixed vector lands uniformly on the sphere, so E[(Pi e_1)_1^2] = 1/d over seeds (a QR without the
    # sign fix has a positive first column diagonal bias: E[(Pi e_1)_1] > 0)
    first = torch.stack([random_rotation(8, 1000 + s)[0, 0] for s in range(2000)])
    assert abs(first.mean()) < 4 * first.std() / math.sqrt(2000) and abs((first ** 2).mean() - 1 / 8) < 0.01


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 8])
def test_codebook_is_the_lloyd_max_fixed_point_of_the_lemma_1_density(d, b):
    """Each centroid is the mean of the density over its Voronoi cell (Eq. 4's optimality condition), integrated
    here on an independent trapezoid grid; the density integrates to 1 (Lemma 1's constant)."""
    c = turboquant_codebook(d, b)
    assert c.shape == (2 ** b,) and (c[1:] > c[:-1]).all() and torch.allclose(c, -c.flip(0), atol=1e-4)  # grid: 3e-5
    x = torch.linspace(-1, 1, 400_001, dtype=torch.float64)
    f = beta_pdf(x, d)
    assert abs(torch.trapezoid(f, x) - 1) < 1e-6
    edges = torch.cat([x[:1], (c[1:] + c[:-1]) / 2, x[-1:]])
    for k in range(2 ** b):
        cell = (x >= edges[k]) & (x <= edges[k + 1])
        mean = torch.trapezoid(f[cell] * x[cell], x[cell]) / torch.trapezoid(f[cell], x[cell])
        assert abs(mean - c[k]) < 2e-4 / math.sqrt(d) + 1e-3 * abs(c[k])


def test_codebooks_and_costs_are_the_papers():
    """Section 3.1: centroids +-sqrt(2/pi)/sqrt(d) (1 bit) and +-0.453, +-1.51 /sqrt(d) (2 bits) in high dimension;
    Theorem 1: d * C(f, b) ~ 0.36, 0.117, 0.03, 0.009, below sqrt(3) pi / 2 * 4^-b."""
    d = 128
    one, two = turboquant_codebook(d, 1) * math.sqrt(d), turboquant_codebook(d, 2) * math.sqrt(d)
    assert torch.allclose(one, torch.tensor([-1, 1.0]).double() * math.sqrt(2 / math.pi), rtol=3e-3)
    assert torch.allclose(two, torch.tensor([-1.51, -0.453, 0.453, 1.51]).double(), rtol=5e-3)
    x = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    w = beta_pdf(x, d)
    for b, paper in PAPER_DMSE.items():
        c = turboquant_codebook(d, b)
        nearest = (x[:, None] - c[None]).abs().argmin(-1)
        cost = d * torch.trapezoid(w * (x - c[nearest]) ** 2, x)
        assert cost <= bound_mse(b) and abs(cost - paper) < 0.15 * paper, (b, cost)


@pytest.mark.parametrize("prod", [False, True])
@pytest.mark.parametrize("bits,D", [(1, 16), (2, 16), (3, 24), (4, 64), (8, 16)])
def test_store_decodes_exactly_the_algorithms_written_as_loops(bits, D, prod):
    """Algorithm 1: rotate the unit vector, nearest centroid per coordinate (a plain loop), rotate back, rescale.
    Algorithm 2 adds sqrt(pi/2) / d * ||r|| * S^T sign(S r) on the residual of b - 1 bits."""
    g = torch.Generator().manual_seed(bits * 10 + D)
    k, v = torch.randn(1, 2, 5, D, generator=g) * 2, torch.randn(1, 2, 5, D, generator=g)
    method = TurboQuant(bits=bits, variant="prod" if prod else "mse", seed=5)
    store = method.new_layer(0, MODEL)
    kk, vv = drive(store, k, v, [5])[0]
    assert torch.equal(kk, k) and store.held_k == 5  # prefill attends in full precision, then all is packed
    (k_hat,), (v_hat,) = store.decoded(torch.float32)
    Pi, S = random_rotation(D, 5), torch.randn(D, D, generator=torch.Generator().manual_seed(6))

    def mse_loop(x, b):
        out = torch.zeros_like(x)
        if b == 0:
            return out
        c = turboquant_codebook(D, b).float()
        for i in range(x.shape[0]):
            n = x[i].norm()
            y = Pi @ (x[i] / n)  # Algorithm 1 line 5
            y_q = torch.stack([c[(c - y[t]).abs().argmin()] for t in range(D)])  # lines 6 and 9
            out[i] = n * (Pi.T @ y_q)  # line 10, rescaled by the stored norm
        return out

    for x, x_hat, is_key in ((k, k_hat, True), (v, v_hat, False)):
        x = x.reshape(-1, D)
        ref = mse_loop(x, bits - 1 if prod and is_key else bits)
        if prod and is_key:
            r = x - ref
            ref = ref + math.sqrt(math.pi / 2) / D * r.norm(dim=-1, keepdim=True) * (torch.sign(r @ S.T) @ S)
        assert torch.allclose(x_hat.reshape(-1, D), ref, atol=1e-4), (x_hat.reshape(-1, D) - ref).abs().max()


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_mse_distortion_of_unit_vectors_is_within_theorem_1(b):
    """D_mse over random unit vectors and 8 rotations: below sqrt(3) pi/2 4^-b and at the paper's refined value."""
    x = unit(400, 128, b)  # rotation seeds 1000+ below: the inputs must not be the rotation's own Gaussian draws
    d_mse = torch.stack([((x - turboquant_dequantize(turboquant_quantize(x, b, seed=s), 128, b, seed=s)) ** 2)
                         .sum(-1).mean() for s in range(1000, 1008)]).mean()
    assert d_mse <= bound_mse(b) and abs(d_mse - PAPER_DMSE[b]) < 0.15 * PAPER_DMSE[b], d_mse
    # a worst case for a plain scalar quantizer (all mass on one coordinate) is no worse: the rotation randomizes it
    e1 = torch.zeros(1, 128)
    e1[0, 0] = 1.0
    worst = torch.stack([((e1 - turboquant_dequantize(turboquant_quantize(e1, b, seed=s), 128, b, seed=s)) ** 2).sum()
                         for s in range(1000, 1300)]).mean()
    assert worst <= bound_mse(b) and abs(worst - PAPER_DMSE[b]) < 0.2 * PAPER_DMSE[b], worst


def test_prod_is_unbiased_over_seeds_and_mse_is_not():
    """Theorem 2: E<y, x~> = <y, x> over the randomness (Pi and S), with variance <= sqrt(3) pi^2 ||y||^2 / d 4^-b;
    Section 3.2: the 1-bit MSE quantizer shrinks inner products (by ~2/pi in high dimension)."""
    d, n = 32, 1500
    x, y = unit(1, d, 1)[0], torch.randn(d, generator=torch.Generator().manual_seed(2))
    y = y + 2 * x  # well aligned with x, so a multiplicative bias is large
    true = float(x @ y)

    def estimates(bits, prod):  # <y, x~> for n independent draws of (Pi, S)
        return torch.tensor([float(turboquant_dequantize(turboquant_quantize(x, bits, seed=7 * s + 100, prod=prod), d,
                                                         bits, seed=7 * s + 100) @ y) for s in range(n)])

    for bits in (1, 2):
        prod = estimates(bits, True)
        se = prod.std() / math.sqrt(n)
        assert abs(prod.mean() - true) < 4 * se, (bits, prod.mean(), true, se)
        assert prod.var() <= math.sqrt(3) * math.pi ** 2 * float(y @ y) / d * 4.0 ** -bits
    mse = estimates(1, False)
    assert mse.mean() < true - 10 * mse.std() / math.sqrt(n)  # biased toward 0
    assert abs(mse.mean() / true - 2 / math.pi) < 0.08


@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize("bits,D", [(3, 24), (2, 64), (8, 16), (1, 40)])
def test_bytes_measured_are_the_packed_sizes_and_the_nominal_ratio(bits, D, variant):
    B, H, T = 2, 3, 50
    g = torch.Generator().manual_seed(D)
    k, v = torch.randn(B, H, T, D, generator=g).bfloat16(), torch.randn(B, H, T, D, generator=g).bfloat16()
    method = TurboQuant(bits=bits, variant=variant)
    store = method.new_layer(0, MODEL)
    drive(store, k, v, [T])
    blk = store.blocks[0]
    assert blk["v"]["idx"].dtype == torch.uint8 and blk["v"]["idx"].shape == (B, H, T, math.ceil(D * bits / 8))
    key = math.ceil(D * bits / 8) + 2  # codes + a bf16 norm
    if variant == "prod":
        key = math.ceil(D * (bits - 1) / 8) + D // 8 + 4  # b - 1 bit codes, D sign bits, two bf16 norms
        assert blk["k"]["sign"].shape == (B, H, T, D // 8) and (bits > 1) == (blk["k"]["idx"] is not None)
    assert store.k.shape[2] == 0 and store.nbytes() == B * H * T * (key + math.ceil(D * bits / 8) + 2)
    measured = (k.nbytes + v.nbytes) / store.nbytes()
    assert measured == pytest.approx(method.nominal_ratio(CacheSpec(head_dim=D, tokens=T)))


def test_generated_tokens_are_quantized_as_they_come():
    """The paper quantizes during generation: after every step the store holds no full-precision token."""
    k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    store = TurboQuant(bits=2).new_layer(0, MODEL)
    outs = drive(store, k, v, [12] + [1] * 8)
    assert store.held_k == store.held_v == 20 and store.k.shape[2] == 0 and len(store.blocks) == 9
    assert torch.equal(outs[-1][0][:, :, -1], k[:, :, -1])  # the current token attends in full precision


@torch.no_grad()
def test_end_to_end_on_the_tiny_model(tiny):
    x = ids(40, seed=3)
    full = KVCache(tiny, Full())
    ref = tiny(x, cache=full).logits
    nxt = torch.tensor([[9]])
    a = tiny(nxt, cache=full).logits
    errs = {}
    for bits in (2, 4, 8):
        c = KVCache(tiny, TurboQuant(bits=bits))
        assert torch.equal(tiny(x, cache=c).logits, ref)  # prefill attention reads the exact keys
        errs[bits] = float((tiny(nxt, cache=c).logits - a).abs().max())
        assert c.nbytes() < full.nbytes() / 2  # fp32 tiny model: 4-bit codes + a norm per 16 channels
    assert 0 < errs[8] < errs[4] < errs[2] < 0.5, errs
    gen = greedy_generate(tiny, KVCache(tiny, TurboQuant(bits=3, variant="prod")), [ids(30, seed=4)], 6)
    assert len(gen.tokens) == 6 and gen.kv_bytes < gen.full_kv_bytes


@torch.no_grad()
def test_composes_with_snapkv(tiny):
    x = ids(120, seed=5)
    snap = KVCache(tiny, SnapKV(ratio=2, window=8))
    both = KVCache(tiny, Compose(SnapKV(ratio=2, window=8), TurboQuant(bits=4)))
    tiny(x, cache=snap), tiny(x, cache=both)
    for a, b in zip(snap.layers, both.layers):
        assert torch.equal(a.store.kept_slots(), b.store.kept_slots())
    assert both.nbytes() < snap.nbytes() / 3
    gen = greedy_generate(tiny, KVCache(tiny, make_method("snapkv:ratio=2+turboquant:bits=3", 8)), [x], 4)
    assert len(gen.tokens) == 4


def test_from_ratio_picks_bits_against_a_16_bit_cache():
    # 16-bit cache, D = 64: 8 bits 1.94x, 4 bits 3.76x, 3 bits 4.92x, 2 bits 7.11x, 1 bit 12.8x
    assert [TurboQuant.from_ratio(r).bits for r in (2, 4, 8)] == [8, 4, 2]
    assert TurboQuant(bits=4).nominal_ratio() == pytest.approx(2 * 64 * 16 / (2 * (64 * 4 + 16)))
    assert TurboQuant.from_ratio(8, variant="prod").variant == "prod"  # a fixed knob stays
    assert make_method("turboquant", 4) == TurboQuant(bits=4)
    with pytest.raises(ValueError, match="ratio"):
        TurboQuant.from_ratio(0.5)


def test_bad_parameters_are_rejected():
    for bad in (0, 9, 2.5, "4"):
        with pytest.raises(ValueError, match="bits must be an int in 1..8"):
            TurboQuant(bits=bad)
    with pytest.raises(ValueError, match="variant must be one of mse, prod"):
        TurboQuant(variant="unbiased")
    with pytest.raises(ValueError, match="seed"):
        TurboQuant(seed=None)
    store = TurboQuant().new_layer(0, Model())
    store.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
    store.after_attention(Step.dense(torch.zeros(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)))
    assert store.held_k == 2  # any head dim works (the codebook is solved for it)
