"""Post-training conversions (GQA mean-pooling, partial RoPE, the MLA latent cache) on the tiny random Llama:
exactness where the conversion loses nothing, independent references where it does, bytes against closed forms."""

import copy
import math

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.architectures import convert_gqa, convert_mla
from reference_impls.architectures.convert_gqa import pool_kv_heads
from reference_impls.architectures.convert_mla import (MLALatent, frequency_pairs, mha2mla, norm_pairs,
                                                       partial_rope)
from reference_impls.base import Step
from reference_impls.calibration import calibration_steps

L, H, H_KV, D = 2, 4, 2, 16  # the tiny fixture's shape


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def run(model, method, ids, decode=(5, 9)):
    """Prefill then decode a few tokens through KVCache -> (logits of every step, concatenated, the cache)."""
    cache = KVCache(model, method)
    out = [model(ids, cache=cache).logits]
    for t in decode:
        out.append(model(torch.tensor([[t]]), cache=cache).logits)
    return torch.cat(out, dim=1), cache


def attn_layers(model):
    return [layer.self_attn for layer in model.model.layers]


# GQA mean-pooling ---------------------------------------------------------------------------------------------------
def test_pooling_heads_that_are_equal_changes_nothing(tiny, ids):
    same = copy.deepcopy(tiny)
    with torch.no_grad():
        for a in attn_layers(same):  # head 1 := head 0, for keys and values: one KV head's worth of information
            for lin in (a.k_proj, a.v_proj):
                lin.weight[D:] = lin.weight[:D]
    ref, _ = run(same, Full(), ids)
    got, cache = run(pool_kv_heads(same, 1), Full(), ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].store.k.shape[1] == 1


def test_pooled_weights_are_the_mean_of_each_group(tiny):
    pooled = pool_kv_heads(tiny, 1)
    for a, b in zip(attn_layers(tiny), attn_layers(pooled)):
        for name in ("k_proj", "v_proj"):
            w = getattr(a, name).weight
            mean = sum(w[h * D:(h + 1) * D] for h in range(H_KV)) / H_KV  # a plain loop over the heads
            torch.testing.assert_close(getattr(b, name).weight, mean)
        assert b.q_proj.weight is not a.q_proj.weight and torch.equal(b.q_proj.weight, a.q_proj.weight)
    assert pooled.config.num_key_value_heads == 1 and tiny.config.num_key_value_heads == H_KV  # a copy


def test_pooled_cache_bytes_are_measured_and_match_the_closed_form(tiny, ids):
    _, full = run(tiny, Full(), ids)
    _, pooled = run(pool_kv_heads(tiny, 1), Full(), ids)
    T = ids.shape[1] + 2
    assert pooled.nbytes() == convert_gqa.bytes_per_token(L, 1, D, dtype_bytes=4) * T == full.nbytes() // H_KV
    assert full.nbytes() == convert_gqa.bytes_per_token(L, H_KV, D, dtype_bytes=4) * T


# partial RoPE -------------------------------------------------------------------------------------------------------
def test_partial_rope_keeping_every_pair_is_the_original(tiny, ids):
    ref, _ = run(tiny, Full(), ids)
    got, _ = run(partial_rope(tiny, frequency_pairs("low", D // 2, D, L)), Full(), ids)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("strategy, n", [("low", 3), ("high", 2), ("low", 0)])
def test_partial_rope_rotates_only_the_kept_pairs(tiny, ids, strategy, n):
    pairs = frequency_pairs(strategy, n, D, L)
    converted = partial_rope(tiny, pairs)
    _, cache = run(converted, Full(), ids, decode=())
    with torch.no_grad():  # layer 0's keys by hand: RMSNorm(embedding) W_k^T, then RoPE on the kept pairs only
        x = tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(ids))
        k = (x @ tiny.model.layers[0].self_attn.k_proj.weight.T).view(1, -1, H_KV, D).transpose(1, 2)
    want = k.clone()
    pos = torch.arange(ids.shape[1], dtype=torch.float64)
    for p in pairs[0].tolist():
        angle = pos * 10000.0 ** (-2 * p / D)
        cos, sin = angle.cos().float(), angle.sin().float()
        a, b = k[..., p], k[..., p + D // 2]
        want[..., p], want[..., p + D // 2] = a * cos - b * sin, b * cos + a * sin
    torch.testing.assert_close(cache.layers[0].store.k, want, atol=1e-5, rtol=1e-5)
    if n < D // 2:
        ref, _ = run(tiny, Full(), ids, decode=())
        assert not torch.allclose(run(converted, Full(), ids, decode=())[0], ref, atol=1e-3)


def test_partial_rope_leaves_the_original_model_alone(tiny, ids):
    before, _ = run(tiny, Full(), ids)
    partial_rope(tiny, frequency_pairs("high", 1, D, L))
    assert torch.equal(run(tiny, Full(), ids)[0], before)


def test_norm_pairs_ranks_pairs_by_query_times_key_norm():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, H, 30, D, generator=g), torch.randn(1, H_KV, 30, D, generator=g)
    q[..., 5] *= 4  # pair 5 (dims 5 and 13) of every query head: the largest contribution
    k[..., 13] *= 3
    k[..., 2] *= 2.5
    step = Step.dense(q, k, torch.randn(1, H_KV, 30, D, generator=g))
    score = torch.zeros(D // 2)
    for h in range(H):  # the paper's S_2-norm, as a loop: sum_h mean_t ||q_h,p|| * mean_t ||k_g(h),p||
        for p in range(D // 2):
            qn = (q[0, h, :, p] ** 2 + q[0, h, :, p + D // 2] ** 2).sqrt().mean()
            kk = k[0, h // (H // H_KV)]
            score[p] += qn * (kk[:, p] ** 2 + kk[:, p + D // 2] ** 2).sqrt().mean()
    got = norm_pairs([step, step], 3)
    assert got.shape == (2, 3) and set(got[0].tolist()) == set(score.topk(3).indices.tolist())
    assert 5 in got[0].tolist() and 2 in got[0].tolist()


# the MLA latent cache -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("basis", ["svd", "pca"])
def test_mla_at_full_rank_with_every_rope_dim_is_the_full_cache(tiny, ids, basis):
    ref, _ = run(tiny, Full(), ids)
    got, cache = run(tiny, MLALatent(rank=H_KV * D, basis=basis), ids)  # pairs None: RoPE on every pair
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cache.layers[1].store.c.shape == (1, ids.shape[1] + 2, H_KV * D)


@pytest.mark.parametrize("basis, balance", [("svd", False), ("pca", True)])
def test_mla_at_full_rank_after_partial_rope_loses_nothing_more(tiny, ids, basis, balance):
    pairs = frequency_pairs("low", 2, D, L)
    converted, method = mha2mla(tiny, H_KV * (D - 4) + H_KV * D, pairs, basis=basis, balance=balance)
    ref, _ = run(converted, Full(), ids)
    torch.testing.assert_close(run(converted, method, ids)[0], ref, atol=1e-5, rtol=1e-5)


def low_rank_reference(model, pairs, rank, basis, balance):
    """The converted model as MHA2MLA writes it: k_nope and v from rank-r weights P P^T [W_k,nope / s; W_v] (keys
    scaled back by s), P from an SVD of the weights or an eigendecomposition of the partial-RoPE model's calibration
    states, s = 1 or the keys' norm over the values' (of the weights or of the states); computed here."""
    ref = partial_rope(model, pairs)
    calib = calibration_steps(ref, None, "random", 1024) if basis == "pca" else None  # before any weight changes
    for i, a in enumerate(attn_layers(ref)):
        keep = torch.zeros(D, dtype=torch.bool)
        keep[pairs[i]] = keep[pairs[i] + D // 2] = True
        nope = [h * D + j for h in range(H_KV) for j in range(D) if not keep[j]]
        w_k, w_v = a.k_proj.weight.detach()[nope].double(), a.v_proj.weight.detach().double()
        if basis == "svd":
            s = float(w_k.norm() / w_v.norm()) if balance else 1.0
            P = torch.linalg.svd(torch.cat([w_k / s, w_v]))[0][:, :rank]
        else:
            k, v = calib[i].keys[0].transpose(0, 1), calib[i].values[0].transpose(0, 1)  # (T, H_kv, D)
            zk, zv = k[:, :, ~keep].reshape(k.shape[0], -1).double(), v.reshape(v.shape[0], -1).double()
            s = float(zk.norm() / zv.norm()) if balance else 1.0
            z = torch.cat([zk / s, zv], dim=1)
            P = torch.linalg.eigh(z.T @ z)[1].flip(-1)[:, :rank]
        w_r = P @ P.T @ torch.cat([w_k / s, w_v])
        assert balance == (not math.isclose(s, 1.0, rel_tol=1e-3))  # the balanced case really rescales
        with torch.no_grad():
            a.k_proj.weight[nope] = (w_r[:len(nope)] * s).float()
            a.v_proj.weight.copy_(w_r[len(nope):].float())
    return ref


@pytest.mark.parametrize("basis, balance", [("svd", False), ("svd", True), ("pca", False), ("pca", True)])
def test_mla_at_low_rank_equals_the_low_rank_projection_weights(tiny, ids, basis, balance):
    pairs = frequency_pairs("high", 3, D, L)
    converted, method = mha2mla(tiny, 20, pairs, basis=basis, balance=balance)
    ref, _ = run(low_rank_reference(tiny, pairs, 20, basis, balance), Full(), ids)
    got, _ = run(converted, method, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, run(converted, Full(), ids)[0], atol=1e-3)  # and rank 20 does lose something


@pytest.mark.parametrize("batch", [1, 2])
def test_mla_cache_bytes_are_measured_and_match_the_closed_form(tiny, batch):
    pairs = frequency_pairs("low", 3, D, L)
    converted, method = mha2mla(tiny, 10, pairs)
    cache = KVCache(converted, method)
    ids = torch.randint(3, 128, (batch, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        converted(ids, cache=cache)
        assert cache.nbytes() == convert_mla.bytes_per_token(L, 10, H_KV, 3, dtype_bytes=4) * 25 * batch
        converted(ids[:, :1], cache=cache)
    store = cache.layers[0].store
    assert store.c.shape == (batch, 26, 10) and store.k_rope.shape == (batch, H_KV, 26, 6)
    assert cache.nbytes() == convert_mla.bytes_per_token(L, 10, H_KV, 3, dtype_bytes=4) * 26 * batch
    assert cache.nbytes() < cache.full_nbytes() * (10 + 12) / 64 + 1  # latent + RoPE dims of 2 H_kv D per token


# error paths --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 3, 4, "1", 1.0])
def test_pool_kv_heads_rejects_bad_head_counts(tiny, n):
    with pytest.raises(ValueError, match="n_kv_heads"):
        pool_kv_heads(tiny, n)


@pytest.mark.parametrize("knobs, field", [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"basis": "qr"}, "basis"),
                                          ({"balance": 1}, "balance"), ({"calib_tokens": 2}, "calib_tokens"),
                                          ({"pairs": torch.tensor([1, 2])}, "pairs")])
def test_mla_rejects_bad_knobs(knobs, field):
    with pytest.raises(ValueError, match=field):
        MLALatent(**knobs)


@pytest.mark.parametrize("basis, rank", [("svd", 65), ("pca", 57)])
def test_mla_rejects_a_rank_above_the_joint_dims(tiny, ids, basis, rank):
    converted, method = mha2mla(tiny, rank, frequency_pairs("low", 2, D, L), basis=basis)
    with pytest.raises(ValueError, match="rank must be an int in"):
        run(converted, method, ids)


@pytest.mark.parametrize("pairs", [torch.tensor([[0, 8]] * L), torch.tensor([[1, 1]] * L), torch.tensor([[0]] * 3),
                                   torch.tensor([[-1]] * L), torch.tensor([[0.0]] * L), [[0]] * L])
def test_partial_rope_rejects_bad_pairs(tiny, pairs):
    with pytest.raises(ValueError, match="pairs"):
        partial_rope(tiny, pairs)


def test_frequency_pairs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        frequency_pairs("2-norm", 2, D, L)
    with pytest.raises(ValueError, match="n_pairs"):
        frequency_pairs("low", D, D, L)
    with pytest.raises(ValueError, match="n_pairs"):
        norm_pairs([Step.dense(torch.randn(1, H, 4, D), torch.randn(1, H_KV, 4, D), torch.randn(1, H_KV, 4, D))], 9)


@pytest.mark.slow
def test_embedded_model_conversions_hold_the_expected_bytes(smollm):
    model, tok = smollm
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    _, full = run(model, Full(), ids, decode=())
    _, gqa = run(pool_kv_heads(model, 1), Full(), ids, decode=())
    assert gqa.nbytes() * 3 == full.nbytes() == convert_gqa.bytes_per_token(30, 3, 64) * ids.shape[1]
    converted, method = mha2mla(model, 48, frequency_pairs("low", 4, 64, 30))
    _, mla = run(converted, method, ids, decode=())
    assert mla.nbytes() == convert_mla.bytes_per_token(30, 48, 3, 4) * ids.shape[1] == full.nbytes() * 72 // 384
