"""Eigen Attention (arXiv 2408.05646): keys and values held on calibration principal bases."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.base import Model, Step, nbytes
from reference_impls.calibration import calibration_ids
from reference_impls.generation import greedy_generate
from reference_impls.lowrank import EigenAttention
from reference_impls.methods import make_method
from reference_impls.models import tiny_llama
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def projector(basis):
    return basis.double() @ basis.double().T


def pca(samples, r):
    """Reference: the top-r right singular vectors of the (not centred) samples (N, D), as columns (D, r)."""
    return torch.linalg.svd(samples.double(), full_matrices=False).Vh[:r].T


def threshold_rank(samples, threshold):
    """Reference: the smallest r whose squared singular values hold `threshold` of the total, by a plain loop."""
    s2 = torch.linalg.svdvals(samples.double()) ** 2
    total, acc = float(s2.sum()), 0.0
    for r, e in enumerate(s2.tolist(), start=1):
        acc += e
        if acc >= threshold * total - 1e-9:
            return r
    return len(s2)


@torch.no_grad()
def calibration_kv(model, layer, T):
    """The pre-RoPE keys and the values (T, H_kv D) of a plain forward over the calibration tokens, by hooks."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    hooks = [getattr(attn, f"{n}_proj").register_forward_hook(lambda m, i, o, n=n: seen.update({n: o[0]}))
             for n in ("k", "v")]
    model(calibration_ids("stdlib", T, None, 128))  # no tokenizer: the documented random-token fallback
    [h.remove() for h in hooks]
    return seen["k"], seen["v"]


@pytest.mark.parametrize("layer", [0, 1])
@torch.no_grad()
def test_bases_are_the_pca_of_calibration_keys_per_layer_and_values_per_head(tiny, layer):
    T = 128
    cache = KVCache(tiny, EigenAttention(rank_ratio=0.5, calib_tokens=T))
    tiny(ids(20), cache=cache)
    state = cache.layers[layer].store.state
    k, v = calibration_kv(tiny, layer, T)
    (_, _, rk), (_, _, rv) = state["k_basis"].shape, state["v_basis"].shape
    assert state["k_basis"].shape == (1, 16, rk) and state["v_basis"].shape == (2, 16, rv)
    ref_k = pca(k.reshape(T * 2, 16), rk)  # every KV head's keys are samples of one layer basis
    assert torch.allclose(projector(state["k_basis"][0]), projector(ref_k), atol=1e-5)
    for h in range(2):
        assert torch.allclose(projector(state["v_basis"][h]), projector(pca(v[:, 16 * h:16 * (h + 1)], rv)), atol=1e-5)


@torch.no_grad()
def test_a_threshold_picks_the_smallest_rank_reaching_that_explained_variance(tiny):
    T = 128
    cache = KVCache(tiny, EigenAttention(rank_ratio=None, threshold=0.9, calib_tokens=T))
    tiny(ids(20), cache=cache)
    for layer in (0, 1):
        k, v = calibration_kv(tiny, layer, T)
        state = cache.layers[layer].store.state
        rk = threshold_rank(k.reshape(T * 2, 16), 0.9)
        rv = max(threshold_rank(v[:, 16 * h:16 * (h + 1)], 0.9) for h in range(2))  # one rank for all heads
        assert state["k_basis"].shape[-1] == rk and state["v_basis"].shape[-1] == rv
        assert 1 < rk < 16 and 1 < rv < 16


@pytest.mark.parametrize("rank_ratio", [0.25, 0.5, 0.75])
@torch.no_grad()
def test_a_rank_ratio_finds_the_largest_threshold_that_fits_its_bytes(tiny, rank_ratio):
    """Reference: every threshold a rank can change at (all cumulative explained variances), tried one by one
    with the plain-loop rank; the largest whose ranks (K and V of both layers) sum to <= 4 x rank_ratio x D."""
    T = 128
    cache = KVCache(tiny, EigenAttention(rank_ratio=rank_ratio, calib_tokens=T))
    tiny(ids(20), cache=cache)
    sets = []  # per (layer, K or V): the sample sets that share one rank
    for layer in (0, 1):
        k, v = calibration_kv(tiny, layer, T)
        sets += [[k.reshape(T * 2, 16)], [v[:, :16], v[:, 16:]]]
    energies = []
    for group in sets:
        for x in group:
            s2 = torch.linalg.svdvals(x.double()) ** 2
            energies += (s2.cumsum(0) / s2.sum()).tolist()
    budget, best = 4 * round(rank_ratio * 16), None
    for eps in sorted(energies):
        ranks = [max(threshold_rank(x, eps) for x in group) for group in sets]
        if sum(ranks) <= budget:
            best = ranks
    got = []
    for layer in cache.layers:
        got += [layer.store.state["k_basis"].shape[-1], layer.store.state["v_basis"].shape[-1]]
    assert got == best and budget - 3 <= sum(got) <= budget


@torch.no_grad()
def test_without_rope_attention_runs_in_the_low_rank_space():
    """No RoPE (OPT/MPT path): each KV head's key basis P is the PCA of its keys and its G query heads' queries, and
    q (k P P^T)^T == (q P)(k P)^T: the logits attention computes over rebuilt keys are the low-rank space's."""
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, D = 1, 4, 2, 64, 16
    mix = torch.randn(D, D, generator=g) * torch.logspace(0, -2, D)[:, None]  # a decaying spectrum
    q, k, v = (torch.randn(B, n, T, D, generator=g) @ mix for n in (H, H_kv, H_kv))
    model = Model(num_layers=1, rope=None, calibration=lambda text, tokens: [Step.dense(q, k, v)])
    store = EigenAttention(rank_ratio=0.25).new_layer(0, model)
    store.append(k, v)
    store.after_attention(Step.dense(q, k, v))
    k1 = torch.randn(B, H_kv, 1, D, generator=g)
    k_all, v_all, _ = store.append(k1, k1)
    P, latent = store.state["k_basis"], store.blocks[0]["k"]  # (H_kv, D, 4), (B, H_kv, T, 4)
    q1 = torch.randn(B, H, 1, D, generator=g)
    for j in range(H_kv):
        samples = torch.cat([k[0, j], q[0, 2 * j:2 * j + 2].reshape(-1, D)])
        assert torch.allclose(projector(P[j]), projector(pca(samples, 4)), atol=1e-5)
        for i in (2 * j, 2 * j + 1):  # the G query heads of KV head j
            full_space = q1[0, i] @ k_all[0, j, :T].T
            low_space = (q1[0, i] @ P[j]) @ latent[0, j].T
            assert torch.allclose(full_space, low_space, atol=1e-4)
    assert torch.equal(k_all[:, :, T:], k1)  # the decoded token attends over its own key exact


@torch.no_grad()
def test_full_rank_gives_the_logits_of_full(tiny):
    x = ids(40)
    for method in (EigenAttention(rank_ratio=1.0), EigenAttention(rank_ratio=None, threshold=1.0)):
        full, eig = KVCache(tiny, Full()), KVCache(tiny, method)
        assert torch.equal(tiny(x, cache=eig).logits, tiny(x, cache=full).logits)
        for t in (5, 6, 7):
            nxt = torch.tensor([[t]])
            assert torch.allclose(tiny(nxt, cache=eig).logits, tiny(nxt, cache=full).logits, atol=1e-5)


@torch.no_grad()
def test_bytes_are_the_latents_plus_the_bases():
    model = tiny_llama(dtype=torch.bfloat16)
    cache = KVCache(model, EigenAttention(rank_ratio=0.25))
    model(ids(40), cache=cache)
    model(torch.tensor([[5]]), cache=cache)
    latents = sum(nbytes([(b["k"], b["v"]) for b in layer.store.blocks]) for layer in cache.layers)
    ranks = [(layer.store.state["k_basis"].shape[-1], layer.store.state["v_basis"].shape[-1]) for layer in cache.layers]
    dims = sum(rk + rv for rk, rv in ranks)
    assert latents * 2 * 2 * 16 == cache.full_nbytes() * dims and dims <= 0.25 * 2 * 2 * 16  # (r_k + r_v) / 2D
    bases = sum((1 * rk + 2 * rv) * 16 * 2 for rk, rv in ranks)  # one key basis + a value basis per KV head, bf16
    assert cache.nbytes() == latents + bases + 2 * 2 * 4  # + each row's first position, int32 per head


@torch.no_grad()
def test_generation_end_to_end_and_replay(tiny):
    x = ids(48)
    full = greedy_generate(tiny, KVCache(tiny, Full()), [x], 8)
    assert greedy_generate(tiny, KVCache(tiny, EigenAttention(rank_ratio=1.0)), [x], 8).tokens == full.tokens
    live = greedy_generate(tiny, KVCache(tiny, EigenAttention(rank_ratio=0.5)), [x], 8)
    assert len(live.tokens) == 8 and live.kv_bytes < full.kv_bytes
    rec = record_prefill(tiny, x)
    replay = cache_from_record(tiny, EigenAttention(rank_ratio=0.5), rec)
    assert greedy_generate(tiny, replay, [], 8, logits=rec.logits).tokens == live.tokens


def test_from_ratio_and_make_method():
    assert EigenAttention.from_ratio(4).rank_ratio == 0.25 and EigenAttention.from_ratio(4).nominal_ratio() == 4
    by_threshold = EigenAttention.from_ratio(4, threshold=0.95)
    assert by_threshold.rank_ratio is None and by_threshold.nominal_ratio() == 1.0
    made = make_method("eigen-attention", 2)
    assert isinstance(made, EigenAttention) and made.rank_ratio == 0.5 and made.calib_tokens == 1024


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="set exactly one of rank_ratio and threshold"):
        EigenAttention(rank_ratio=0.5, threshold=0.9)
    with pytest.raises(ValueError, match="set exactly one of rank_ratio and threshold"):
        EigenAttention(rank_ratio=None)
    for kw, match in ((dict(rank_ratio=0), "rank_ratio must be in"), (dict(rank_ratio=2), "rank_ratio must be in"),
                      (dict(rank_ratio=None, threshold=1.5), "threshold must be in"),
                      (dict(calib_tokens=4), "calib_tokens")):
        with pytest.raises(ValueError, match=match):
            EigenAttention(**kw)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        EigenAttention.from_ratio(0.5)
    store = EigenAttention().new_layer(0, Model())  # no calibration prefill available
    k = torch.randn(1, 2, 4, 16)
    store.append(k, k)
    with pytest.raises(ValueError, match="needs calibration prefills"):
        store.after_attention(Step.dense(k, k, k))
