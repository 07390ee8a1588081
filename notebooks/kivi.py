# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # KIVI: 2-bit keys per channel, values per token
#
# **What you will learn:** why KIVI (Liu et al., arXiv 2402.02750) quantizes keys *per channel* and values
# *per token*, what the full-precision window of recent tokens is for, and what 2- and 4-bit caches cost
# and keep on a passkey task, with bytes measured from the tensors the cache holds.
#
# Asymmetric min-max quantization of a group $X_g$ of $G$ numbers to $b$ bits (Eq. 1-2 of the paper):
#
# $$z_g = \min X_g,\qquad s_g = \frac{\max X_g - \min X_g}{2^b - 1},\qquad
#   Q(x) = \operatorname{clamp}\Big(\Big\lfloor \frac{x - z_g}{s_g} \Big\rceil, 0, 2^b-1\Big),\qquad
#   \hat x = z_g + s_g\,Q(x).$$
#
# Keys $K \in \mathbb{R}^{T\times D}$ are grouped along tokens (each group: $G$ tokens of one channel);
# values along channels (each group: $G$ channels of one token). The newest tokens (up to $R$) stay in
# full precision: keys move to the quantized part in blocks of $R$, values one at a time.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model
from reference_impls.base import Model, Step
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt
from reference_impls.replay import record_prefill
from reference_impls.quantization import KIVI, choose_qparams, dequantize, quantize
from reference_impls.quantization.kivi import kivi_split

model, tok = load_model()
_ = torch.manual_seed(0)  # the random test inputs below: the same on every run

# %% [markdown]
# ## A check: what the cache holds after prefill and after decoding
# With $G=32$, $R=128$ and a 300-token prompt, keys keep $300 \bmod 128 = 44$ tokens in full precision and
# values the newest 128; each decoded token joins the window, and after 84 tokens the keys flush a block of
# 128. (The flush is checked on one layer's store with random states; the model check is one decode step.)

# %%
method = KIVI(bits=2, group_size=32, residual_length=128)
store = method.new_layer(0, Model())
k, v = torch.randn(1, 3, 384, 64).half(), torch.randn(1, 3, 384, 64).half()
kk, vv, _ = store.append(k[:, :, :300], v[:, :, :300])
store.after_attention(Step.dense(kk, kk, vv))  # KIVI reads nothing from the step but its flags
print("after prefill: quantized keys", store.held_k, "fp keys", store.k.shape[2],
      "| quantized values", store.held_v, "fp values", store.v.shape[2])
assert (store.held_k, store.k.shape[2], store.held_v, store.v.shape[2]) == (256, 44, 172, 128)
for t in range(300, 384):
    kk, vv, _ = store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    store.after_attention(Step.dense(kk[:, :, -1:], kk, vv, compress=False))
print("after 84 decoded tokens:", store.held_k, store.k.shape[2], store.held_v, store.v.shape[2],
      "| kivi_split(384) =", kivi_split(384, group_size=32, residual_length=128))

ids = torch.randint(100, 5000, (1, 300))
full, q2 = KVCache(model, Full()), KVCache(model, method)
with torch.no_grad():
    assert torch.equal(model(ids, cache=full).logits, model(ids, cache=q2).logits)  # prefill attention is exact
    a, b = model(torch.tensor([[42]]), cache=full).logits, model(torch.tensor([[42]]), cache=q2).logits
print("first decoded token: max |logit difference|", round((a - b).abs().max().item(), 3),
      "| same argmax:", bool(a.argmax() == b.argmax()))
print(f"bytes held {q2.nbytes():,} vs full fp32 cache {full.nbytes():,}")

# %% [markdown]
# ## The paper's observation in miniature: keys have outlier channels, values do not
# KIVI's Figure 2 shows key caches with a few channels of large magnitude that persist across tokens, and
# value caches without such structure. Here: the mean |K| and |V| per channel, and heat maps of |K| and |V|
# over tokens, for one layer of SmolLM2 on a ~1,000-token passkey prompt. In the key map a few rows
# (channels) stay bright at every token: a per-channel range isolates them. The value map has no such rows;
# its variation runs along tokens, and since attention mixes value *tokens*, a per-token range keeps each
# token's error to itself.

# %%
sample = passkey_samples(1, 1000, seed=0, tokenizer=tok)[0]
ctx, _ = build_prompt(tok, sample["context"], sample["question"], sample["answer_prefix"])
rec = record_prefill(model, ctx)
layer = 15
K, V = rec.keys[layer][0], rec.values[layer][0]  # (H_kv, T, D)
fig, ax = plt.subplots(2, 2, figsize=(13, 6))
ax[0, 0].bar(range(K.shape[-1]), K[0].abs().mean(0))
ax[0, 0].set_title(f"layer {layer}, head 0: mean |K| per channel")
ax[1, 0].bar(range(V.shape[-1]), V[0].abs().mean(0), color="tab:orange"); ax[1, 0].set_title("mean |V| per channel")
ax[0, 1].imshow(K[0, :400].abs().T, aspect="auto", cmap="magma"); ax[0, 1].set_title("|K|: channels (rows) x tokens")
ax[1, 1].imshow(V[0, :400].abs().T, aspect="auto", cmap="magma"); ax[1, 1].set_title("|V|: channels (rows) x tokens")
for a in ax[:, 0]:
    a.set_xlabel("channel")
for a in ax[:, 1]:
    a.set_xlabel("token")
plt.tight_layout(); plt.show()


def outlier_ratio(x):  # max over channels of the per-channel mean |x|, over the median channel
    m = x.abs().mean(dim=-2)  # (H_kv, D)
    return (m.amax(-1) / m.median(-1).values).mean().item()


kr = [outlier_ratio(k[0]) for k in rec.keys]
vr = [outlier_ratio(v[0]) for v in rec.values]
print(f"largest / median channel magnitude, mean over layers: keys {sum(kr) / len(kr):.1f}x, "
      f"values {sum(vr) / len(vr):.1f}x")

# %% [markdown]
# ## Why this grouping: attention error of the four choices at 2 bits
# The paper's Table 1 fake-quantizes Llama-2 caches four ways and finds only per-channel keys + per-token
# values usable at 2 bits. We measure the relative error of the attention output of the last 64 queries
# of every layer under each choice (groups of 32, no full-precision window, so only the grouping differs).


# %%
def fake(x, dim, bits=2, group=32):
    s, z = choose_qparams(x, bits=bits, dim=dim, group_size=group)
    return dequantize(quantize(x, s, z, bits=bits, dim=dim, group_size=group), s, z, dim=dim, group_size=group)


def attn(q, k, v, scaling):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    T, nq = k.shape[2], q.shape[2]
    mask = torch.ones(nq, T, dtype=torch.bool).tril(T - nq)
    return torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(~mask, float("-inf")), -1) @ v


choices = {"K per-channel, V per-token (KIVI)": (2, 3), "K per-token, V per-token": (3, 3),
           "K per-channel, V per-channel": (2, 2), "K per-token, V per-channel": (3, 2)}
errors = {name: [] for name in choices}
for q, k, v in zip(rec.queries, rec.keys, rec.values):
    q = q[:, :, -64:]
    ref = attn(q, k, v, rec.scaling)
    for name, (dk, dv) in choices.items():
        out = attn(q, fake(k, dk), fake(v, dv), rec.scaling)
        errors[name].append(((out - ref).norm() / ref.norm()).item())
for name, e in errors.items():
    plt.plot(e, label=name)
plt.yscale("log"); plt.xlabel("layer"); plt.ylabel("relative error of attention output"); plt.legend(fontsize=8)
plt.title("2-bit fake quantization, groups of 32"); plt.show()
print(f"{'grouping':36} {'mean rel. error':>15}")
for name, e in errors.items():
    print(f"{name:36} {sum(e) / len(e):15.3f}")

# %% [markdown]
# ## Evidence: 30 passkey prompts of ~1.5k tokens
# These evidence runs held an fp32 cache on CPU, and their ratios count against it: `KIVI.from_ratio(r, FP32)`
# maps the targets 2, 4 and 8 to 8-, 4- and 1-bit codes (G = 32, R = 128), which give about 2.8x, 4.1x and 6.2x
# against fp32 (fp32 scales, an fp32 window of R tokens). The benchmark (`kvatlas bench`, the leaderboard)
# counts against a 16-bit cache, as both seeds do; the table below shows what the same codes give there.

# %%
from reference_impls.quantization.ratios import FP32, CacheSpec
from reference_impls.report import show_evidence

print(f"{'bits':>4} {'vs fp32 (this run)':>18} {'vs fp16':>8}   (nominal ratios at 1,500 tokens, G=32, R=128)")
for b in (8, 4, 2, 1):
    print(f"{b:4d} {KIVI(bits=b).nominal_ratio(FP32):18.2f} {KIVI(bits=b).nominal_ratio(CacheSpec(bits=16)):8.2f}")
# measured at 4k tokens on one layer of SmolLM2's shape (3 KV heads, D = 64) in fp16: the bytes the store holds
k16, v16 = torch.randn(1, 3, 4096, 64).half(), torch.randn(1, 3, 4096, 64).half()
for b in (4, 2):
    st = KIVI(bits=b).new_layer(0, Model())
    kk, vv, _ = st.append(k16, v16)
    st.after_attention(Step.dense(kk, kk, vv))
    print(f"KIVI-{b} at 4,096 tokens: {st.nbytes() / (k16.nbytes + v16.nbytes):.3f}x of fp16")
show_evidence("results/quantization/kivi.json", "KIVI on SmolLM2-135M")

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (Llama-2/3, Mistral, Falcon) | here (SmolLM2-135M, fp32 on CPU; 30 passkey prompts of ~1.5k tokens) |
# |---|---|---|
# | key outlier channels | a few fixed channels of large magnitude in keys, none in values (Fig. 2) | see the bar plots and the largest/median ratio printed above |
# | grouping | only per-channel K + per-token V keeps 2-bit accuracy (Table 1) | the same ordering of attention errors (table above) |
# | accuracy | KIVI-2 close to fp16 on LongBench, 4-bit near lossless; the benchmark seed (arXiv 2407.01527) finds KIVI-2 keeps 91% on a 64-digit needle | evidence above: KIVI-4 (4.3x / 4.1x against fp32) and KIVI-8 keep 30/30 passkeys in both settings, like the full cache (30/30); KIVI-1, the nearest to 8x (6.8x / 6.5x), keeps none |
# | memory | 2.6x less peak memory with 2 bits, incl. weights; ~5x for the cache at 10k tokens (seed's arithmetic) | the nominal-ratio table: 4-bit codes give 4.1x against fp32 but 2.8x against fp16, where the 128-token window weighs less; at 4,096 tokens the store holds 0.323x (KIVI-4) and 0.200x (KIVI-2) of fp16 with G=32 (printed above) |
# | speed | up to 3.47x throughput with the fused CUDA kernels | not measured here (no GPU); `scripts/bench_kivi_triton.py` measures it on a GPU |
