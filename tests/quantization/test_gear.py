"""GEAR (arXiv 2403.05527): X ~ D + L + S, checked against SVD facts and hand-computed tails."""

import math

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.quantization.gear import GEAR, gear_decompose, gear_reconstruct
from reference_impls.quantization.ratios import FP32

from quant_checks import MODEL, drive, ids


def kv(B=2, H=2, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) + torch.randn(B, H, 1, D, generator=g) * 3  # channel offsets
    k[..., 2] *= 6  # an outlier channel
    return k, torch.randn(B, H, T, D, generator=g)


@pytest.mark.parametrize("dim", [2, 3])
def test_error_never_grows_with_rank_and_matches_the_discarded_singular_values(dim):
    x = kv()[0]
    errs = []
    for r in range(0, 17):
        q, out, S, A, Bt = gear_decompose(x, bits=2, group_size=8, dim=dim, rank=r, outlier_frac=0.05)
        err = ((x - gear_reconstruct(q, S, A, Bt)) ** 2).sum((-1, -2))  # per (row, head)
        residual = x - q.dequantize() - S
        sv = torch.linalg.svdvals(residual)  # Eckart-Young: what rank r leaves out
        assert torch.allclose(err, (sv[..., r:] ** 2).sum(-1), rtol=1e-3, atol=1e-4)
        errs.append(float(err.sum()))
    assert all(a >= b - 1e-4 for a, b in zip(errs, errs[1:])) and errs[8] < 0.5 * errs[0]
    assert errs[16] < 1e-6 * errs[0]  # full rank: exact


@pytest.mark.parametrize("dim,frac", [(2, 0.05), (3, 0.1)])
def test_sparse_part_holds_each_vectors_tails_exactly(dim, frac):
    x = kv(seed=1)[0]
    q, out, S, A, Bt = gear_decompose(x, bits=2, group_size=8, dim=dim, rank=0, outlier_frac=frac)
    n = x.shape[dim]
    k = math.ceil(frac * n / 2)
    rank = x.argsort(dim=dim).argsort(dim=dim)
    assert torch.equal(out, (rank < k) | (rank >= n - k))
    assert torch.allclose((q.dequantize() + S)[out], x[out], atol=1e-6) and (S[~out] == 0).all()


@torch.no_grad()
def test_store_components_add_up_to_what_attention_reads_and_every_byte_is_counted():
    k, v = kv(T=50, seed=2)
    m = GEAR(bits=2, group_size=8, rank=3, outlier_frac=0.05, buffer_size=4)
    store = m.new_layer(0, MODEL)
    outs = drive(store, k, v, [40] + [1] * 10)
    assert torch.equal(outs[0][0], k[:, :, :40])  # prefill attention is exact
    keys, values = outs[-1]  # 50 tokens: the prompt block, 2 decoding blocks of 4, 2 in the buffer
    assert [b["kq"].shape[2] for b in store.blocks] == [40, 4, 4] and store.k.shape[2] == 2
    for t0, t1 in ((0, 40), (40, 44), (44, 48)):
        for x, got, dim in ((k, keys, 2), (v, values, 3)):
            q, _, S, A, Bt = gear_decompose(x[:, :, t0:t1], bits=2, group_size=8, dim=dim, rank=3, outlier_frac=0.05)
            parts = q.dequantize() + S + A @ Bt.transpose(-1, -2)  # D + S + L
            assert torch.allclose(got[:, :, t0:t1], parts, atol=1e-5)
    assert torch.equal(keys[:, :, 48:], k[:, :, 48:50])
    B, H, D = 2, 2, 16
    expect = 2 * B * H * 2 * D * 4  # the buffer: 2 tokens, keys and values, fp32
    for n in (40, 4, 4):
        codes = 2 * B * H * n * D * 2 // 8
        scales = 2 * 4 * (B * H * math.ceil(n / 8) * D + B * H * n * math.ceil(D / 8))  # keys, values: scale + zero
        factors = 2 * 4 * B * H * (n + D) * min(3, n, D)
        expect += codes + scales + factors
    expect += sum(b[x].idx.numel() for b in store.blocks for x in ("kS", "vS")) * (4 + 4)
    assert store.nbytes() == expect


@torch.no_grad()
def test_prefill_is_exact_and_rank_and_outliers_bring_decoding_closer_to_full(tiny):
    x = ids(48, seed=3)
    full = KVCache(tiny, Full())
    ref = tiny(x, cache=full).logits
    nxt = tiny(torch.tensor([[9]]), cache=full).logits
    errs = {}
    methods = {"quant": GEAR(rank=0, outlier_frac=0.0, group_size=16), "gear": GEAR(rank=8, group_size=16)}
    for name, m in methods.items():
        cache = KVCache(tiny, m)
        assert torch.equal(tiny(x, cache=cache).logits, ref)
        errs[name] = float((tiny(torch.tensor([[9]]), cache=cache).logits - nxt).abs().max())
    assert errs["gear"] < 0.5 * errs["quant"], errs


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        GEAR(bits=3)
    with pytest.raises(ValueError, match="rank"):
        GEAR(rank=-1)
    with pytest.raises(ValueError, match="outlier_frac"):
        GEAR(outlier_frac=0.6)
    with pytest.raises(ValueError, match="buffer_size"):
        GEAR(buffer_size=0)
    with pytest.raises(ValueError, match="ratio"):
        GEAR.from_ratio("4")
    # fp32 cache: 8 bits 2.51, 4 bits 3.66, 2 bits 4.75, 1 bit 5.58
    assert [GEAR.from_ratio(r, FP32).bits for r in (1, 3, 3.1, 4.1, 4.2, 5.1, 5.2, 8)] == [8, 8, 4, 4, 2, 2, 1, 1]
    # 16-bit cache: 8 bits 1.48, 4 bits 2.36, 2 bits 3.35, 1 bit 4.23
    assert [GEAR.from_ratio(r).bits for r in (1, 1.8, 1.9, 2.8, 2.9, 3.7, 3.8, 8)] == [8, 8, 4, 4, 2, 2, 1, 1]
