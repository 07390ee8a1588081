"""KVQuant (arXiv 2401.18079): pre-RoPE per-channel keys, nuqX levels, dense-and-sparse outliers."""

import copy
import math

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.models import tiny_llama
from reference_impls.quantization import kvquant
from reference_impls.quantization.kvquant import (KVQuant, apply_rope, fit_levels, kvquant_fake, nuq_quantize,
                                                  rope_cos_sin)
from reference_impls.quantization.primitives import dense_range
from reference_impls.quantization.ratios import FP32

from quant_checks import MODEL, drive, ids


@torch.no_grad()
def test_undoing_rope_recovers_the_models_pre_rope_keys(tiny):
    """Reference: the k_proj output of the model, captured by a hook, before transformers applies RoPE."""
    seen = {}
    hook = tiny.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.update(k=o))
    cache = KVCache(tiny, Full())
    tiny(ids(37), cache=cache)
    hook.remove()
    post = cache.layers[1].store.k  # (1, 2, 37, 16), after RoPE
    pre = seen["k"].view(1, 37, 2, 16).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(37), 16, 10000.0)
    assert torch.allclose(apply_rope(post, cos, sin, inverse=True), pre, atol=1e-5)
    assert torch.allclose(apply_rope(pre, cos, sin), post, atol=1e-5)


def llama(rope_parameters):
    """tiny_llama's architecture with other RoPE parameters (tiny_llama itself fixes theta = 1e4)."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny_llama().config)
    cfg.rope_parameters = rope_parameters
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


ROPES = {
    "default 1e4": None,  # tiny_llama() as it is
    "theta 1e5 (SmolLM2)": {"rope_type": "default", "rope_theta": 1e5},
    "llama3 scaling": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    # yarn folds attention_scaling = 0.1 ln(factor) + 1 into cos and sin: the inverse must divide it out
    "yarn (attention scaling)": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                 "original_max_position_embeddings": 1024},
}


@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_the_keys_kvquant_quantizes_are_the_models_k_proj_outputs(rope, monkeypatch):
    """Reference: each layer's k_proj output, captured by a hook before the model applies its RoPE. The spy sees
    what the store hands to nuq_quantize (keys first, then values), on the prefill and on a decoded token."""
    model = tiny_llama() if ROPES[rope] is None else llama(ROPES[rope])
    rotary = model.model.rotary_emb
    assert (rotary.attention_scaling != 1.0) == rope.startswith("yarn")  # the case is what its name says
    pre, quantized = [], []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: pre.append(o))
             for layer in model.model.layers]
    spy = lambda x, *a: quantized.append(x) or nuq_quantize(x, *a)  # noqa: E731
    monkeypatch.setattr(kvquant, "nuq_quantize", spy)
    cache = KVCache(model, KVQuant(bits=8, rope_theta=1e4))  # the fallback theta is wrong for all but the first
    model(ids(37), cache=cache)
    model(torch.tensor([[9]]), cache=cache)
    for h in hooks:
        h.remove()
    H, D = model.config.num_key_value_heads, model.config.head_dim
    assert len(pre) == 4 and len(quantized) == 8  # 2 layers x (prefill, decoded token); keys and values each
    for got, want in zip(quantized[0::2], pre):
        want = want.view(1, -1, H, D).transpose(1, 2)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim,frac", [(2, 0.1), (3, 0.1), (2, 0.01), (3, 0.0)])
def test_outliers_are_exactly_each_vectors_tails_and_are_kept_exactly(dim, frac):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 3, 50, 16, generator=g) * torch.rand(1, 1, 1, 16, generator=g) * 3
    x_hat, out, _ = kvquant_fake(x, bits=2, outlier_frac=frac, dim=dim)
    n = x.shape[dim]
    k = math.ceil(frac * n / 2)  # per tail, the official count
    rank = x.argsort(dim=dim).argsort(dim=dim)  # 0 = smallest entry of its vector
    expect = (rank < k) | (rank >= n - k)
    assert torch.equal(out, expect)
    assert int(out.sum()) == 2 * k * x.numel() // n
    assert torch.equal(x_hat[out], x[out])  # bit-exact


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_non_outliers_are_the_nearest_level_and_within_the_bound(bits):
    x = torch.randn(1, 2, 200, 8, generator=torch.Generator().manual_seed(bits))
    x_hat, out, levels = kvquant_fake(x, bits=bits, outlier_frac=0.02, dim=2)
    lo, hi = dense_range(x, 0.02, 2)
    half = (hi - lo) / 2
    xn = (x - (hi + lo) / 2) / half  # brute force: the nearest of the 2^bits levels
    nearest = levels[(xn[..., None] - levels).abs().argmin(-1)] * half + (hi + lo) / 2
    assert torch.allclose(x_hat[~out], nearest[~out], atol=1e-5)
    gap = max(float(levels[0] + 1), float(1 - levels[-1]), float((levels[1:] - levels[:-1]).max()) / 2)
    assert ((x - x_hat).abs() <= gap * half + 1e-5).all()  # no dense entry farther than half a level gap


def test_kmeans_levels_beat_a_uniform_grid_on_bell_shaped_data():
    x = (torch.randn(20000, generator=torch.Generator().manual_seed(0)) / 2.5).clamp(-1, 1)
    for bits in (2, 3):
        nuq, uni = fit_levels(x, bits), torch.linspace(-1, 1, 2 ** bits)
        err = lambda lv: ((x[:, None] - lv).abs().min(-1).values ** 2).mean()  # noqa: E731
        assert err(nuq) < 0.8 * err(uni)


@torch.no_grad()
def test_store_equals_the_reference_on_pre_rope_keys_and_counts_its_bytes():
    g = torch.Generator().manual_seed(1)
    B, H, T, D, bits, theta = 2, 2, 40, 16, 3, 500.0
    pre, v = torch.randn(B, H, T + 1, D, generator=g), torch.randn(B, H, T + 1, D, generator=g)
    pre[..., 3] *= 8  # an outlier channel
    cos, sin = rope_cos_sin(torch.arange(T + 1), D, theta)
    k = apply_rope(pre, cos, sin)
    store = KVQuant(bits=bits, outlier_frac=0.05, n_sink=2, rope_theta=theta).new_layer(0, MODEL)
    (k0, v0), (k1, v1) = drive(store, k, v, [T, 1])
    assert torch.equal(k0, k[:, :, :T]) and torch.equal(v0, v[:, :, :T])  # prefill attention is exact
    keep = (torch.arange(T) >= 2)[None, None, :, None]  # sinks stay out of calibration
    ref_k, _, _ = kvquant_fake(pre[:, :, :T], bits=bits, outlier_frac=0.05, dim=2, keep=keep)
    ref_v, _, _ = kvquant_fake(v[:, :, :T], bits=bits, outlier_frac=0.05, dim=3, keep=keep)
    ref_k[:, :, :2], ref_v[:, :, :2] = pre[:, :, :2], v[:, :, :2]  # sinks exact
    assert torch.allclose(apply_rope(k1[:, :, :T], cos[:T], sin[:T], inverse=True), ref_k, atol=1e-5)
    assert torch.allclose(v1[:, :, :T], ref_v, atol=1e-5)
    assert torch.equal(k1[:, :, T:], k[:, :, T:])  # the new token: full precision
    n_out = sum(b[x].idx.numel() for b in store.blocks for x in ("k_out", "v_out"))
    expect = (2 * B * H * (T + 1) * math.ceil(D * bits / 8)  # packed codes
              + 2 * B * H * D * 4 + 2 * B * H * (T + 1) * 4  # key ranges per channel, value ranges per token
              + 2 * 2 ** bits * 4 + B * 8 + n_out * (4 + 4))  # levels, row offsets, outliers (int32 + fp32)
    assert store.nbytes() == expect


@torch.no_grad()
def test_a_later_key_outside_the_calibrated_channel_range_is_kept_exactly():
    g = torch.Generator().manual_seed(2)
    pre, v = torch.randn(1, 1, 31, 8, generator=g), torch.randn(1, 1, 31, 8, generator=g)
    pre[0, 0, 30, 5] = 50.0  # the decoded token, far outside channel 5's prompt range
    cos, sin = rope_cos_sin(torch.arange(31), 8, 1e4)
    store = KVQuant(bits=2, n_sink=0).new_layer(0, MODEL)
    drive(store, apply_rope(pre, cos, sin), v, [30, 1])
    before = store.blocks[-1]["k_out"].idx.numel()  # the decoded token's block
    keys, _, _ = store.append(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    back = apply_rope(keys[:, :, :31], cos, sin, inverse=True)
    assert abs(float(back[0, 0, 30, 5]) - 50.0) < 1e-4 and before > 0


@torch.no_grad()
def test_prefill_is_exact_and_decoding_converges_to_full_as_bits_grow(tiny):
    x = ids(48, seed=3)
    full = KVCache(tiny, Full())
    ref = tiny(x, cache=full).logits
    ref_next = tiny(torch.tensor([[9]]), cache=full).logits
    errs = []
    for bits in (2, 4, 8):
        cache = KVCache(tiny, KVQuant(bits=bits))
        assert torch.equal(tiny(x, cache=cache).logits, ref)
        errs.append(float((tiny(torch.tensor([[9]]), cache=cache).logits - ref_next).abs().max()))
        assert cache.nbytes() < full.nbytes()
    assert errs[2] < errs[1] < errs[0] < 0.5 and errs[2] < 1e-3


@torch.no_grad()
def test_left_padded_rows_decode_like_the_full_cache(tiny):
    a, b = ids(30, seed=5), ids(22, seed=6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    outs = []
    for method in (Full(), KVQuant(bits=8)):
        c = KVCache(tiny, method)
        tiny(batch, attention_mask=mask, cache=c)
        m2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        outs.append(tiny(torch.tensor([[11], [11]]), attention_mask=m2, cache=c).logits)
    assert torch.allclose(outs[0], outs[1], atol=2e-3)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        KVQuant(bits=0)
    with pytest.raises(ValueError, match="outlier_frac"):
        KVQuant(outlier_frac=0.5)
    with pytest.raises(ValueError, match="n_sink"):
        KVQuant(n_sink=-1)
    with pytest.raises(ValueError, match="rope_theta"):
        KVQuant(rope_theta=0)
    with pytest.raises(ValueError, match="ratio"):
        KVQuant.from_ratio(0.5)
    # fp32 cache, 1500 tokens: 8 bits 3.23, 6 bits 4.05, 4 bits 5.42, 2 bits 8.2
    assert [KVQuant.from_ratio(r, FP32).bits for r in (1, 2, 4, 5.4, 8, 20)] == [8, 8, 6, 4, 2, 1]
    # 16-bit cache: 8 bits 1.72, 7 bits 1.93, 4 bits 3.02, 3 bits 3.72, 2 bits 4.85, 1 bit 6.96
    assert [KVQuant.from_ratio(r).bits for r in (1, 2, 3, 4, 8)] == [8, 7, 4, 3, 1]


@pytest.mark.slow
def test_achieved_ratio_and_answer_on_the_embedded_model(smollm):
    from reference_impls import run_sample
    from reference_impls.data import passkey_samples

    model, tok = smollm
    s = passkey_samples(1, 800, seed=1, tokenizer=tok)[0]
    r = run_sample(model, tok, KVQuant(bits=4, rope_theta=1e5), s["context"], s["question"], max_new_tokens=8,
                   answer_prefix=s["answer_prefix"])
    assert s["answer"] in r["answer"]
    assert 2.7 < r["achieved_ratio"] < 3.4  # against a 16-bit cache: 16 / (4 + overheads), ~3.0x at 1.5k tokens
