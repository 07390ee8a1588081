"""QJL (arXiv 2406.03482): 1-bit JL sketches of keys, the unbiased inner-product estimator, packed storage."""

import math

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.quantization.qjl import QJL, qjl_dequantize, qjl_projection, qjl_quantize, qjl_scores

from quant_checks import MODEL, drive, ids


def test_the_estimator_is_unbiased_over_random_projections():
    """Over 3000 independent S, the mean estimate of <q, k> lies within 4 standard errors of the truth."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    k[0] = q[0] + 0.3 * k[0]  # a key well aligned with its query, one anti-aligned, one generic
    k[1] = -q[1] + 0.5 * k[1]
    true = (q * k).sum(-1)
    est = []
    for seed in range(3000):
        S = qjl_projection(16, 32, seed)
        signs, norms = qjl_quantize(k, S)
        # the paper's formula, written out here: sqrt(pi/2)/m * ||k|| * <S q, sign(S k)>
        by_hand = math.sqrt(math.pi / 2) / 32 * k.norm(dim=-1) * ((q @ S.T) * torch.sign(k @ S.T)).sum(-1)
        ours = qjl_scores(q[:, None], signs[:, None], norms[:, None], S)[:, 0, 0]
        assert torch.allclose(ours, by_hand, atol=1e-4)
        est.append(ours)
    est = torch.stack(est)  # (3000, 3)
    se = est.std(0) / math.sqrt(len(est))
    assert ((est.mean(0) - true).abs() < 4 * se).all(), (est.mean(0), true, se)
    assert (est.std(0) > 0.05 * true.abs()).all()  # a real random estimator, not an exact product


def test_dequantized_keys_give_the_estimator_and_error_shrinks_with_m():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 32, generator=g), torch.randn(40, 32, generator=g)
    errs = []
    for m in (64, 256, 1024):
        S = qjl_projection(32, m, seed=m)
        signs, norms = qjl_quantize(k, S)
        k_hat = qjl_dequantize(signs, norms, S)
        assert torch.allclose(q @ k_hat.T, qjl_scores(q, signs, norms, S), atol=1e-4)
        errs.append(float(((q @ k_hat.T - q @ k.T) ** 2).mean()))
    assert errs[0] > 2 * errs[1] > 4 * errs[2]  # variance ~ 1 / m


def test_store_blocks_pack_one_bit_per_sketch_dimension_and_count_every_byte():
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 2, 70, 16
    k, v = torch.randn(B, H, T + 30, D, generator=g), torch.randn(B, H, T + 30, D, generator=g)
    method = QJL(sketch_dim=64, outlier_sketch_dim=32, n_outliers=2, group_size=8, value_bits=2, buffer_size=32)
    store = method.new_layer(0, MODEL)
    outs = drive(store, k, v, [T] + [1] * 30)
    assert torch.equal(outs[0][0], k[:, :, :T])  # prefill attention is exact
    # prefill: 64 of 70 tokens in one block; decoding: one more block of 32 at 96 tokens; 4 left in full precision
    assert [b["sign_in"].shape for b in store.blocks] == [(B, H, 64, 64 // 8), (B, H, 32, 64 // 8)]
    assert store.blocks[0]["sign_out"].shape == (B, H, 64, 32 // 8) and store.k.shape[2] == 4
    per_token = 64 // 8 + 32 // 8 + 2 * 4 + D * 2 // 8 + 2 * (D // 8) * 4  # signs, 2 norms, value codes + scales
    expect = 3 * 32 * B * H * per_token + 3 * B * H * (32 // 8) * 2 + 2 * B * H * 4 * D * 4  # + outlier idx, tail
    assert store.nbytes() == expect


@torch.no_grad()
def test_store_keys_are_the_split_estimator_of_the_official_kernel():
    """<q, k_hat> = inlier estimator on the group's ordinary channels + outlier estimator on its outlier channels."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 1, 17, 16, generator=g), torch.randn(1, 1, 17, 16, generator=g)
    k[..., 5] *= 10
    method = QJL(sketch_dim=64, outlier_sketch_dim=32, n_outliers=2, group_size=8, buffer_size=16)
    store = method.new_layer(0, MODEL)
    keys, _ = drive(store, k, v, [16, 1])[1]
    S = qjl_projection(16, 64, 42)
    q = torch.randn(16, generator=g)
    for t in range(16):
        grp = k[0, 0, t // 8 * 8:t // 8 * 8 + 8]
        out = torch.zeros(16, dtype=torch.bool)
        out[grp.norm(dim=0).topk(2).indices] = True
        assert out[5]
        k_in, k_out = k[0, 0, t] * ~out, k[0, 0, t] * out
        est = (math.sqrt(math.pi / 2) / 64 * k_in.norm() * ((S @ (q * ~out)) * torch.sign(S @ k_in)).sum()
               + math.sqrt(math.pi / 2) / 32 * k_out.norm() * ((S[:32] @ (q * out)) * torch.sign(S[:32] @ k_out)).sum())
        assert torch.allclose(q @ keys[0, 0, t], est, atol=1e-4)


@torch.no_grad()
def test_prefill_is_exact_and_short_prompts_stay_full(tiny):
    x = ids(40, seed=4)
    full = KVCache(tiny, Full())
    ref = tiny(x, cache=full).logits
    small, big = KVCache(tiny, QJL(buffer_size=32, group_size=8)), KVCache(tiny, QJL(buffer_size=64))
    assert torch.equal(tiny(x, cache=small).logits, ref) and torch.equal(tiny(x, cache=big).logits, ref)
    nxt = torch.tensor([[7]])
    a, b, c = tiny(nxt, cache=full).logits, tiny(nxt, cache=big).logits, tiny(nxt, cache=small).logits
    assert torch.equal(a, b) and big.nbytes() == full.nbytes()  # 41 < 64 tokens: nothing quantized yet
    assert not torch.equal(a, c) and torch.allclose(a, c, atol=0.5) and small.nbytes() < full.nbytes()


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="sketch_dim"):
        QJL(sketch_dim=12)
    with pytest.raises(ValueError, match="outlier_sketch_dim"):
        QJL(sketch_dim=64, outlier_sketch_dim=128)
    with pytest.raises(ValueError, match="value_bits"):
        QJL(value_bits=3)
    with pytest.raises(ValueError, match="buffer_size"):
        QJL(buffer_size=40, group_size=32)
    with pytest.raises(ValueError, match="n_outliers"):
        QJL(n_outliers=16).projections(16, "cpu")
