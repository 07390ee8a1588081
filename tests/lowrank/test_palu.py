"""Palu (arXiv 2407.21118): rank-r latents per group of KV heads; keys rebuilt, then rotated."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.base import Model, Step, nbytes
from reference_impls.calibration import calibration_ids
from reference_impls.compose import Compose
from reference_impls.generation import greedy_generate
from reference_impls.integration import model_info
from reference_impls.lowrank import Palu
from reference_impls.lowrank.projection import rotate
from reference_impls.methods import make_method
from reference_impls.models import tiny_llama
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def hook_io(model, layer, names=("k_proj", "v_proj")):
    """Capture the inputs and outputs of a layer's projections, forward after forward: {name: [(x, y), ...]}."""
    seen = {n: [] for n in names}
    attn = model.model.layers[layer].self_attn
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen[n].append((i[0], o))) for n in names]
    return seen, hooks


def heads(y, H):
    """(1, T, H D) projection output -> (1, H, T, D)."""
    return y.view(1, y.shape[1], H, -1).transpose(1, 2)


def truncated(w, g, D, r):
    """The reference: Palu's factorised weight, W_r = U_r S_r V_r^T per group of g heads, by a plain SVD."""
    out = []
    for wg in w.double().split(g * D, dim=0):
        U, S, Vh = torch.linalg.svd(wg, full_matrices=False)
        out.append(U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
    return torch.cat(out).float()


@torch.no_grad()
def test_undoing_rope_recovers_the_k_proj_output(tiny):
    seen, hooks = hook_io(tiny, 1)
    cache = KVCache(tiny, Full())
    tiny(ids(37), cache=cache)
    [h.remove() for h in hooks]
    post, pre = cache.layers[1].store.k, heads(seen["k_proj"][0][1], 2)  # (1, 2, 37, 16)
    pos = torch.arange(37).expand(1, 2, 37)
    rope = model_info(tiny).rope
    assert not torch.allclose(post, pre, atol=1e-2)  # RoPE moved them
    assert torch.allclose(rotate(post, pos, rope, inverse=True), pre, atol=1e-5)
    assert torch.allclose(rotate(pre, pos, rope, inverse=False), post, atol=1e-5)


@pytest.mark.parametrize("kv_heads,group_size,rank_ratio", [(2, 1, 0.5), (2, 2, 0.25), (2, 4, 0.5), (4, 2, 0.75)])
@torch.no_grad()
def test_held_latents_rebuild_the_truncated_svd_projections(kv_heads, group_size, rank_ratio):
    """Reference: x W_r^T with W_r from a plain torch.linalg.svd of each group of W_k (W_v), x the projection's
    input captured by a hook, rotated with the model's RoPE for keys. A spy sees what attention gets when decoding:
    the prompt's keys and values rebuilt from latents; the decoded token's own key exact."""
    model = tiny_llama(num_heads=4, num_kv_heads=kv_heads)
    D, g = 16, min(group_size, kv_heads)
    r = round(rank_ratio * g * D)
    seen, hooks = hook_io(model, 1)
    cache = KVCache(model, Palu(rank_ratio=rank_ratio, group_size=group_size, decompose="svd"))
    model(ids(29), cache=cache)
    [h.remove() for h in hooks]
    store = cache.layers[1].store
    got = {}
    orig = store.after_attention
    store.after_attention = lambda step: (got.update(k=step.keys, v=step.values), orig(step))
    model(torch.tensor([[7]]), cache=cache)
    w = model_info(model).weights(1)
    (xk, k_pre), (xv, v) = seen["k_proj"][0], seen["v_proj"][0]
    ref_k = heads(xk @ truncated(w["k"], g, D, r).T, kv_heads)
    ref_v = heads(xv @ truncated(w["v"], g, D, r).T, kv_heads)
    pos = torch.arange(29).expand(1, kv_heads, 29)
    ref_k = rotate(ref_k, pos, model_info(model).rope, inverse=False)
    assert torch.allclose(got["k"][:, :, :29], ref_k, atol=1e-4)
    assert torch.allclose(got["v"][:, :, :29], ref_v, atol=1e-4)
    exact = rotate(heads(k_pre, kv_heads), pos, model_info(model).rope, inverse=False)
    if r < g * D:
        assert not torch.allclose(got["k"][:, :, :29], exact, atol=1e-2)  # truncation did change them
    # the latent identity: the held latent is the pre-RoPE key on U_r, i.e. Palu's h = x V_r S_r^(1/2) times S_r^(1/2)
    U, S, Vh = torch.linalg.svd(w["k"][: g * D].double(), full_matrices=False)
    h_palu = xk.double() @ (torch.diag(S[:r].sqrt()) @ Vh[:r]).T  # (1, T, r): the official down-projection
    latent = store.blocks[0]["k"][0, 0].double()  # (T, r), group 0
    k_group = heads(k_pre, kv_heads)[0, :g].permute(1, 0, 2).reshape(29, g * D).double()
    assert torch.allclose(latent, k_group @ store.state["k_basis"][0].double(), atol=1e-4)
    proj = store.state["k_basis"][0].double()
    assert torch.allclose(proj @ proj.T, U[:, :r] @ U[:, :r].T, atol=1e-5)  # same subspace as the SVD's U_r
    assert torch.allclose((h_palu * S[:r].sqrt()) @ U[:, :r].T, latent @ proj.T, atol=1e-4)


@torch.no_grad()
def test_whitened_basis_is_svd_llm_whitening_of_the_weights():
    """Reference: the official `--decompose_method whiten` (from SVD-LLM): C = cholesky(X^T X) of the
    projection's calibration inputs, SVD of W C; its top-r left singular vectors span the kept subspace."""
    model, T = tiny_llama(), 256
    seen, hooks = hook_io(model, 0)
    model(calibration_ids("stdlib", T, None, 128))  # the tiny model has no tokenizer: random calibration tokens
    [h.remove() for h in hooks]
    cache = KVCache(model, Palu(rank_ratio=0.25, group_size=1, calib_tokens=T))
    model(ids(20), cache=cache)
    w, state = model_info(model).weights(0), cache.layers[0].store.state
    for name, basis in (("k", state["k_basis"]), ("v", state["v_basis"])):
        x = seen[f"{name}_proj"][0][0][0].double()  # (T, d)
        C = torch.linalg.cholesky(x.T @ x)
        for head, wh in enumerate(w[name].double().split(16)):
            U = torch.linalg.svd(wh @ C, full_matrices=False).U[:, :4]
            P = basis[head].double()
            assert P.shape == (16, 4) and torch.allclose(P @ P.T, U @ U.T, atol=1e-5), (name, head)


@pytest.mark.parametrize("decompose", ["svd", "whiten"])
@pytest.mark.parametrize("group_size", [1, 2])
@torch.no_grad()
def test_full_rank_gives_the_logits_of_full(tiny, decompose, group_size):
    x = ids(40)
    full, palu = KVCache(tiny, Full()), KVCache(tiny, Palu(rank_ratio=1.0, group_size=group_size, decompose=decompose))
    assert torch.equal(tiny(x, cache=palu).logits, tiny(x, cache=full).logits)  # the prefill attends exactly
    for t in (5, 6, 7):
        nxt = torch.tensor([[t]])
        assert torch.allclose(tiny(nxt, cache=palu).logits, tiny(nxt, cache=full).logits, atol=1e-5)
    lossy = KVCache(tiny, Palu(rank_ratio=0.25, group_size=group_size, decompose=decompose))
    tiny(x, cache=lossy)
    assert not torch.allclose(tiny(torch.tensor([[5]]), cache=lossy).logits,
                              tiny(torch.tensor([[5]]), cache=KVCache(tiny, Full())).logits, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_bytes_are_rank_over_dims_of_full_plus_one_set_of_bases(dtype):
    model = tiny_llama(dtype=dtype)
    cache = KVCache(model, Palu(rank_ratio=0.25, value_rank_ratio=0.5, group_size=2, decompose="svd"))
    model(ids(40), cache=cache)
    for t in (5, 6, 7):
        model(torch.tensor([[t]]), cache=cache)
    latents = sum(nbytes([(b["k"], b["v"]) for b in layer.store.blocks]) for layer in cache.layers)
    assert latents * 8 == cache.full_nbytes() * 3  # (r_k + r_v) / 2 g D = (8 + 16) / 64 of keys and values
    bases = 2 * 32 * (8 + 16) * model.dtype.itemsize  # layers x g D x (r_k + r_v)
    starts = 2 * 2 * 4  # layers x heads x int32: each row's first position
    assert cache.nbytes() == latents + bases + starts
    assert all(isinstance(b["pos"], int) for layer in cache.layers for b in layer.store.blocks)


@torch.no_grad()
def test_left_padded_rows_decode_like_each_row_alone(tiny):
    """Positions as `generate` passes them (from the mask): each row's latents and logits match the row alone."""
    method, (a, b) = Palu(rank_ratio=0.5, group_size=1, decompose="svd"), (ids(30, seed=5), ids(22, seed=6))
    alone = []
    for x in (a, b):
        c = KVCache(tiny, method)
        tiny(x, cache=c)
        alone.append(torch.cat([tiny(torch.tensor([[11 + t]]), cache=c).logits[:, -1] for t in range(3)]))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    c = KVCache(tiny, method)
    tiny(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=c)
    outs = []
    for t in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        outs.append(tiny(torch.tensor([[11 + t]] * 2), attention_mask=mask, position_ids=pos, cache=c).logits[:, -1])
    outs = torch.stack(outs, 1)
    assert torch.allclose(outs[0], alone[0], atol=1e-4) and torch.allclose(outs[1], alone[1], atol=1e-4)


@torch.no_grad()
def test_generation_end_to_end_replay_and_composition(tiny):
    x = ids(48)
    full = greedy_generate(tiny, KVCache(tiny, Full()), [x], 8)
    assert greedy_generate(tiny, KVCache(tiny, Palu(rank_ratio=1.0)), [x], 8).tokens == full.tokens
    half = greedy_generate(tiny, KVCache(tiny, Palu(rank_ratio=0.5)), [x], 8)
    assert len(half.tokens) == 8 and half.kv_bytes < full.kv_bytes
    rec = record_prefill(tiny, x)
    replayed = greedy_generate(tiny, cache_from_record(tiny, Palu(rank_ratio=0.5), rec), [], 8, logits=rec.logits)
    assert replayed.tokens == half.tokens
    composed = make_method("streamingllm+palu", 4)  # evicts while decoding: the latent store is re-made each step
    assert isinstance(composed, Compose) and isinstance(composed.quant, Palu)
    assert len(greedy_generate(tiny, KVCache(tiny, composed), [x], 8).tokens) == 8


def test_from_ratio_and_make_method():
    assert Palu.from_ratio(4).rank_ratio == 0.25 and Palu.from_ratio(4).nominal_ratio() == 4
    assert Palu.from_ratio(2, rank_ratio=0.5, group_size=1).group_size == 1
    split = Palu.from_ratio(2, value_rank_ratio=0.75)  # the keys get what the values leave of the target
    assert split.rank_ratio == 0.25 and split.nominal_ratio() == 2
    made = make_method("palu", 8)
    assert isinstance(made, Palu) and made.rank_ratio == 0.125 and made.decompose == "whiten"


def test_bad_parameters_are_rejected():
    for kw, match in ((dict(rank_ratio=0), "rank_ratio must be in"), (dict(rank_ratio=1.5), "rank_ratio must be in"),
                      (dict(value_rank_ratio=0), "value_rank_ratio must be in"),
                      (dict(group_size=0), "group_size must be an int >= 1"), (dict(decompose="pca"), "decompose"),
                      (dict(calib_tokens=4), "calib_tokens")):
        with pytest.raises(ValueError, match=match):
            Palu(**kw)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        Palu.from_ratio(0.5)
    model = tiny_llama(num_heads=6, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"group_size must divide the number of KV heads \(3\)"):
        model(ids(8), cache=KVCache(model, Palu(group_size=2)))
    store = Palu(decompose="svd").new_layer(0, Model())  # a model whose projections are unknown
    k = torch.randn(1, 2, 4, 16)
    store.append(k, k)
    with pytest.raises(ValueError, match="needs the model's projection weights"):
        store.after_attention(Step.dense(k, k, k))
