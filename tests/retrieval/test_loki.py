"""Loki (arXiv 2406.02542): the keys' PCA, the rank-d approximate scores, the keys read and the bytes read, against
an SVD and plain formulas."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.base import Model
from reference_impls.calibration import calibration_ids
from reference_impls.generation import greedy_generate
from reference_impls.integration import model_info
from reference_impls.retrieval.loki import Loki, loki_pca, loki_scores

from retrieval_checks import (budget_covering_length_is_full, decode_reads_exactly_the_selection, ids, kv_bytes_of,
                              left_padded_batch_equals_batch_one, read_shrinks_with_the_budget, spy_select)


def test_pca_is_the_svd_of_the_centred_keys_and_finds_a_low_rank():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1, 2, 300, 3, generator=g) @ torch.randn(1, 2, 3, 10, generator=g)  # rank-3 keys ...
    keys = low + 0.01 * torch.randn(1, 2, 300, 10, generator=g) + 2.0  # ... plus noise, off-centre
    basis, ratio = loki_pca(keys)
    for h in range(2):
        x = keys[0, h] - keys[0, h].mean(0)
        _, s, vt = torch.linalg.svd(x, full_matrices=False)
        assert torch.allclose(ratio[h], s ** 2 / (s ** 2).sum(), atol=1e-5)
        assert torch.allclose((basis[h].T @ vt.T)[:3, :3].abs(), torch.eye(3), atol=1e-4)  # same axes up to sign
        assert torch.allclose(basis[h].T @ basis[h], torch.eye(10), atol=1e-5)  # orthonormal
    assert (ratio[:, :3].sum(-1) > 0.999).all()  # three directions explain the keys


def test_approximate_scores_are_the_projected_dot_products():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 8, generator=g), torch.randn(1, 2, 15, 8, generator=g)
    basis, _ = loki_pca(torch.randn(1, 2, 100, 8, generator=g))
    P = basis[:, :, :3]
    ours = loki_scores(q, k @ P, P, 0.5)
    for h in range(4):
        for t in range(15):
            ref = sum(float(q[0, h] @ P[h // 2, :, i]) * float(k[0, h // 2, t] @ P[h // 2, :, i]) for i in range(3))
            assert abs(float(ours[0, h // 2, h % 2, t]) - 0.5 * ref) < 1e-5
    exact = torch.einsum("bghd,bgtd->bght", q.view(1, 2, 2, 8), k) * 0.5  # all directions: the exact logits
    assert torch.allclose(loki_scores(q, k @ basis, basis, 0.5), exact, atol=1e-5)


@torch.no_grad()
def test_the_basis_is_the_pca_of_the_calibration_keys_before_or_after_rope(tiny):
    calib = model_info(tiny).calibration("stdlib", 1024)  # no tokenizer: random tokens, seed 0
    post = KVCache(tiny, Loki(rank=4, keys="post"))
    pre = KVCache(tiny, Loki(rank=4))
    x = calibration_ids("random", 1024, vocab_size=128)
    seen = {}
    hooks = [tiny.model.layers[i].self_attn.k_proj.register_forward_hook(
        lambda m, a, out, i=i: seen.setdefault(i, out)) for i in range(2)]
    tiny(x)  # a plain forward: k_proj's outputs are the keys before RoPE
    for h in hooks:
        h.remove()
    for layer in range(2):
        basis, _ = loki_pca(calib[layer].keys)  # the first 4 directions of the (post-RoPE) calibration keys
        assert torch.equal(post.layers[layer].store.basis, basis[:, :, :4])
        k_pre = seen[layer].view(1, 1024, 2, 16).transpose(1, 2)
        ref, _ = loki_pca(k_pre)
        ours = pre.layers[layer].store.basis
        for h in range(2):  # same subspace (projectors agree; eigenvector signs may differ)
            assert torch.allclose(ours[h] @ ours[h].T, ref[h, :, :4] @ ref[h, :, :4].T, atol=1e-4), (layer, h)
        assert not torch.allclose(ours, post.layers[layer].store.basis, atol=1e-2)  # RoPE changes the axes


@torch.no_grad()
def test_the_store_reads_the_brute_force_top_k_and_reports_those_bytes(tiny):
    cache = KVCache(tiny, Loki(budget=10, rank=4))
    log = spy_select(cache)
    tiny(ids(33, seed=1), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    for layer in range(2):
        P = cache.layers[layer].store.basis
        for e in log[layer][1:]:
            T = e["k"].shape[2]
            q = e["q"][0, :, -1]
            sel = torch.zeros(2, T, dtype=torch.bool)
            for g in range(2):
                kp = e["k"][0, g] @ P[g]  # (T, d)
                score = sum(torch.softmax((kp @ (P[g].T @ q[h])) * e["scaling"], 0) for h in (2 * g, 2 * g + 1))
                sel[g, score.topk(10).indices] = True
            assert torch.equal(e["sel"][0, :, 0], sel), (layer, T)
            # keys and values read, the rank-4 key coordinates of every key, and the basis
            assert e["read"] == kv_bytes_of(sel, e["k"], e["v"]) + 2 * T * 4 * 4 + P.nbytes


def test_decoding_reads_exactly_the_selected_keys(tiny):
    decode_reads_exactly_the_selection(tiny, Loki(budget=10, rank=4))


def test_a_budget_covering_every_key_is_the_full_cache(tiny):
    budget_covering_length_is_full(tiny, Loki(budget=44))


def test_left_padded_batch_equals_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, Loki(budget=12, rank=4))


def test_bytes_read_shrink_with_the_budget_and_the_basis_is_held(tiny):
    read_shrinks_with_the_budget(tiny, lambda r: Loki(ratio=r))
    gen = greedy_generate(tiny, KVCache(tiny, Loki.from_ratio(4)), [ids(64)], 3)
    assert gen.kv_bytes == 2 * 2 * 2 * 64 * 16 * 4 + 2 * 2 * 16 * 4 * 4  # full cache + per layer H_kv x D x d fp32


def test_from_ratio_presets_and_errors():
    assert Loki().read_budget(torch.tensor([400])).item() == 100  # paper's main setting k_f = 0.25 (and d_f = 0.25)
    assert Loki.from_ratio(8).ratio == 8 and Loki.from_ratio(8, budget=5).ratio is None
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        Loki(rank=0)
    with pytest.raises(ValueError, match="keys must be 'pre' or 'post'"):
        Loki(keys="mid")
    with pytest.raises(ValueError, match="calib_tokens must be an int >= 8"):
        Loki(calib_tokens=4)
    with pytest.raises(ValueError, match="Loki needs calibration keys"):
        Loki().new_layer(0, Model())
