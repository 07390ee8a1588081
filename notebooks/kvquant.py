# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # KVQuant: quantize keys before RoPE, on levels fitted to the data, with outliers set aside
#
# **What you will learn:** why KVQuant (Hooper et al., arXiv 2401.18079) quantizes keys *per channel* and
# *before* the rotary embedding, what a non-uniform datatype (nuqX) and a dense-and-sparse split add, and
# how each of these steps lowers the error on SmolLM2's real keys, with bytes measured from the tensors
# the cache holds.
#
# For a key channel (or a value token) $x$, KVQuant drops a fraction $f$ of outliers (kept exactly, as a
# sparse set), maps the rest onto $[-1, 1]$ and rounds each entry to the nearest of $2^b$ levels $\ell_j$
# fitted to calibration data (k-means; the paper weights it by Fisher information):
#
# $$\tilde x = \frac{x - (h + l)/2}{(h - l)/2},\qquad
#   \{\ell_j\} = \arg\min_{\ell}\sum_i \min_j (\tilde x_i - \ell_j)^2,\qquad
#   \hat x = \begin{cases} x & x \notin [l, h] \text{ (sparse)} \\ \ell_{j^*}\,(h - l)/2 + (h + l)/2 & \text{else,}\end{cases}$$
#
# where $[l, h]$ is the range left once the $\lceil f n / 2 \rceil$ largest and smallest entries are
# dropped. Keys are quantized before RoPE, $k = R_\theta(p)^{-1} k_{\text{post}}$, and rotated again after
# de-quantization; the first token (an attention sink) is kept exact.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model
from reference_impls.base import Model, Step
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt
from reference_impls.replay import record_prefill
from reference_impls.quantization import choose_qparams, dequantize, quantize
from reference_impls.quantization.kvquant import KVQuant, apply_rope, kvquant_fake, rope_cos_sin

model, tok = load_model()
THETA = model.config.rope_parameters["rope_theta"]  # 1e5 for SmolLM2 (Llama-2: 1e4)
print("RoPE theta:", THETA, "| head dim:", model.config.head_dim)

# %% [markdown]
# ## A check: outliers and the sink come back exactly, everything else within a level
# A store fed 200 random keys with one loud channel: 1% of each key channel and of each value token is kept
# exactly, the first token too, and the rest lands on one of the $2^3$ levels. Inside a model the cache hands
# each store the model's own rotary embedding (`Model.rope`: positions to cos, sin); here we hand it default
# RoPE with SmolLM2's theta, the same function that made the post-RoPE keys.

# %%
g = torch.Generator().manual_seed(0)
pre, v = torch.randn(1, 2, 201, 64, generator=g), torch.randn(1, 2, 201, 64, generator=g)
pre[..., 7] *= 10
cos, sin = rope_cos_sin(torch.arange(201), 64, THETA)
store = KVQuant(bits=3).new_layer(0, Model(rope=lambda positions: rope_cos_sin(positions, 64, THETA)))
kk, vv, _ = store.append(apply_rope(pre[:, :, :200], cos[:200], sin[:200]), v[:, :, :200])
store.after_attention(Step.dense(torch.zeros(1, 2, 200, 64), kk, vv, scaling=0.125))
keys, values, _ = store.append(apply_rope(pre[:, :, 200:], cos[200:], sin[200:]), v[:, :, 200:])
back = apply_rope(keys, cos, sin, inverse=True)[:, :, :200]
ref, out, levels = kvquant_fake(pre[:, :, 1:200], bits=3, outlier_frac=0.01, dim=2)
prompt_block = store.blocks[0]  # the 200 prompt tokens, packed (the 201st waits in the full-precision buffer)
print("levels (normalized):", [round(x, 3) for x in store.state["levels_k"].tolist()])
print("sink exact:", torch.allclose(back[:, :, 0], pre[:, :, 0], atol=1e-5),
      "| key outliers held:", prompt_block["k_out"].idx.numel() - 2 * 64,  # minus the sink token's 2 heads x 64
      "| value outliers held:", prompt_block["v_out"].idx.numel() - 2 * 64)
print("store == reference round trip (kvquant_fake):", torch.allclose(back[:, :, 1:], ref, atol=1e-4),
      "| outliers exact:", torch.allclose(back[:, :, 1:][out], pre[:, :, 1:200][out], atol=1e-5))
print(f"bytes held: {store.nbytes():,} vs {2 * pre[:, :, :201].numel() * 4:,} for the fp32 keys and values")

# %% [markdown]
# ## The paper's key observation: pre-RoPE key channels are regular, post-RoPE they are not
# KVQuant's Figure 2 shows that before RoPE, outlier key channels have a consistent magnitude across tokens,
# while RoPE rotates channel pairs $(i, i + D/2)$ by position-dependent angles, so the magnitude of each
# post-RoPE channel swings with position and a per-channel range must cover the swing. We take one layer
# of SmolLM2 on a ~1,000-token passkey prompt and undo RoPE with the model's own rotary embedding (what the
# cache hands KVQuant's stores as `Model.rope`), checked against the layer's `k_proj` output.

# %%
sample = passkey_samples(1, 1000, seed=0, tokenizer=tok)[0]
ctx, _ = build_prompt(tok, sample["context"], sample["question"], sample["answer_prefix"])
layer, D = 15, model.config.head_dim
seen = {}
hook = model.model.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.update(k=o))
rec = record_prefill(model, ctx)
hook.remove()
T = ctx.shape[1]
cos, sin = (t[:, None] for t in KVCache(model, Full()).model_info.rope(torch.arange(T)[None]))  # (1, 1, T, D) each
post_all = rec.keys
pre_all = [apply_rope(k, cos, sin, inverse=True) for k in rec.keys]
k_proj = seen["k"].view(1, T, -1, D).transpose(1, 2)  # the keys before the model rotated them
print("max |undone RoPE - k_proj output|, layer", layer, ":", float((pre_all[layer] - k_proj).abs().max()))
post, pre_k = post_all[layer][0, 0], pre_all[layer][0, 0]  # head 0, (T, D)

fig, ax = plt.subplots(2, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 2]})
for row, (name, x) in enumerate((("pre-RoPE", pre_k), ("post-RoPE", post))):
    lo, hi = x.quantile(0.01, dim=0), x.quantile(0.99, dim=0)
    ax[row, 0].fill_between(range(x.shape[1]), lo, hi, alpha=0.4, step="mid", label="1-99% of tokens")
    ax[row, 0].plot(x.median(0).values, "k.", ms=3, label="median")
    ax[row, 0].set_title(f"layer {layer}, head 0, {name}: per-channel spread"); ax[row, 0].set_xlabel("channel")
    ax[row, 1].imshow(x[:300].T, aspect="auto", cmap="RdBu_r", vmin=-x.abs().max(), vmax=x.abs().max())
    ax[row, 1].set_title(f"{name} keys: channels (rows) x first 300 tokens"); ax[row, 1].set_xlabel("token")
ax[0, 0].legend(fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# The same observation as a number, for every layer: the relative error, in the post-RoPE space attention
# uses, of 3-bit uniform per-channel quantization of all the prompt's keys (one range per channel), applied
# before or after RoPE.


# %%
def rel(a, b):
    return float((a - b).norm() / b.norm())


def uniform(x, bits, dim, group=None):
    group = group or x.shape[dim]
    s, z = choose_qparams(x, bits=bits, dim=dim, group_size=group)
    return dequantize(quantize(x, s, z, bits=bits, dim=dim, group_size=group), s, z, dim=dim, group_size=group)


err_post = [rel(uniform(k, 3, 2), k) for k in post_all]
err_pre = [rel(apply_rope(uniform(p, 3, 2), cos, sin), k) for p, k in zip(pre_all, post_all)]
plt.figure(figsize=(7, 3))
plt.plot(err_post, "o-", label="per-channel, post-RoPE"); plt.plot(err_pre, "s-", label="per-channel, pre-RoPE")
plt.xlabel("layer"); plt.ylabel("relative key error"); plt.title("3-bit uniform, one range per channel")
plt.legend(); plt.show()
print(f"mean over layers: post-RoPE {sum(err_post) / 30:.3f}, pre-RoPE {sum(err_pre) / 30:.3f}")

# %% [markdown]
# ## Error against bits: each of KVQuant's steps in turn
# The paper's ablation (Table 1) adds its steps one by one and reports perplexity; here, the relative key
# error (post-RoPE space, all layers pooled) and the relative error of the attention logits of the last 32
# queries, for per-token uniform quantization (groups of 64 = one range per head and token), then
# per-channel, pre-RoPE, nuqX levels, and 1% dense-and-sparse outliers.


# %%
def logits_err(keys_hat):
    num = den = 0.0
    for q, k, kh in zip(rec.queries, post_all, keys_hat):
        q, G = q[:, :, -32:], q.shape[1] // k.shape[1]
        ref = q @ k.repeat_interleave(G, 1).transpose(-1, -2)
        num += float(((q @ kh.repeat_interleave(G, 1).transpose(-1, -2) - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return (num / den) ** 0.5


steps = {
    "per-token uniform": lambda b: [uniform(k, b, 3) for k in post_all],
    "per-channel uniform": lambda b: [uniform(k, b, 2) for k in post_all],
    "+ pre-RoPE": lambda b: [apply_rope(uniform(p, b, 2), cos, sin) for p in pre_all],
    "+ nuqX": lambda b: [apply_rope(kvquant_fake(p, bits=b, outlier_frac=0, dim=2)[0], cos, sin) for p in pre_all],
    "+ 1% outliers": lambda b: [apply_rope(kvquant_fake(p, bits=b, outlier_frac=0.01, dim=2)[0], cos, sin)
                                for p in pre_all],
}
table = {}
for name, fn in steps.items():
    for bits in (2, 3, 4):
        kh = fn(bits)
        key_err = (sum(float(((a - b) ** 2).sum()) for a, b in zip(kh, post_all))
                   / sum(float((b ** 2).sum()) for b in post_all)) ** 0.5
        table[name, bits] = (key_err, logits_err(kh))
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
for name in steps:
    ax[0].plot([2, 3, 4], [table[name, b][0] for b in (2, 3, 4)], "o-", label=name)
    ax[1].plot([2, 3, 4], [table[name, b][1] for b in (2, 3, 4)], "o-", label=name)
for a, t in zip(ax, ("relative key error", "relative attention-logit error")):
    a.set_yscale("log"); a.set_xlabel("bits"); a.set_title(t); a.set_xticks([2, 3, 4])
ax[0].legend(fontsize=8); plt.tight_layout(); plt.show()
print(f"{'keys':22} " + " ".join(f"{b}-bit key / logit" for b in (2, 3, 4)))
for name in steps:
    print(f"{name:22} " + " ".join(f"{table[name, b][0]:7.3f} / {table[name, b][1]:6.3f}" for b in (2, 3, 4)))

# %% [markdown]
# ## Evidence: 30 passkey prompts of ~1.5k tokens
# `KVQuant.from_ratio` maps the targets 2, 4 and 8 to nuq8, nuq6 and nuq2 (1% outliers, one sink), the widths
# whose bytes against the fp32 cache this model holds on CPU come nearest: about 3.2x, 4.0x and 8.2x (targets 2 and 8 ran in the
# query-agnostic setting only, target 4 in both).

# %%
from reference_impls.report import show_evidence

show_evidence("results/quantization/kvquant.json", "KVQuant on SmolLM2-135M")

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (LLaMA, Llama-2/3, Mistral) | here (SmolLM2-135M, fp32 on CPU; one prompt for the errors, 30 for the evidence) |
# |---|---|---|
# | pre-RoPE keys | outlier channels are consistent before RoPE, blurred after (Fig. 2); pre-RoPE per-channel quantization lowers perplexity (Table 1) | see the plots: the per-channel error before RoPE vs after, per layer |
# | nuqX | non-uniform, sensitivity-weighted levels beat uniform ones at 3 bits (Table 1) | plain k-means levels fitted on the prompt: the "+ nuqX" row of the table |
# | dense-and-sparse | 1% outliers bring 3-bit within 0.1 perplexity of fp16 (abstract, Table 1) | the "+ 1% outliers" row; the sparse part costs an int32 index + a value per outlier (counted in the bytes) |
# | memory | 3-bit codes plus the sparse 1% (value + index) and per-vector ranges; LLaMA-7B at 1M tokens on one A100-80GB (abstract) | achieved ratio in the evidence table, against fp32: nuq6 4.0x, nuq2 8.2x (about half of it against an fp16 cache) |
# | accuracy | < 0.1 perplexity loss at 3 bits on Wikitext-2 and C4; 1M tokens on one A100 | evidence above: nuq8 and nuq6 (3.2x, 4.0x) keep 30/30 passkeys like the full cache; nuq2 (8.2x) keeps 9/30 (query-agnostic) |
