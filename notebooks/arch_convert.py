# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Converting a trained model to a smaller cache: GQA pooling and MHA -> MLA, before any fine-tuning
#
# **What you will learn:** two ways to give an already trained model a cache that is smaller *by design*, and what
# each loses on the embedded SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads of D = 64) **before** the
# short (up)training the papers always add:
#
# * **GQA by mean-pooling** (Ainslie et al., arXiv 2305.13245, Section 2.1): the key and value projections of the
#   heads of a group are averaged into one head. SmolLM2 is already GQA (3 KV heads); pooling them into one gives
#   MQA and a cache of 1/3 the bytes.
# * **MHA -> MLA** (MHA2MLA, Ji et al., arXiv 2502.14837; TransMLA, Meng et al., arXiv 2502.07864): keep RoPE on
#   only a few frequency pairs of each head (*partial RoPE*), then cache one low-rank latent of the no-RoPE key dims
#   and the values together, plus the few RoPE key dims.
#
# For a layer with weights $W_k, W_v \in \mathbb{R}^{H_{kv} D \times d}$ (nn.Linear's layout), groups of $m$
# consecutive KV heads $j$ pooled, and $z_t = [k^{\text{nope}}_t;\ v_t]$ the joint no-RoPE key and value of a token:
#
# $$W_k'^{(j)} = \tfrac{1}{m}\textstyle\sum_{i<m} W_k^{(jm+i)},\qquad
#   c_t = z_t U_r \in \mathbb{R}^{r}\ \text{(cached, with } k^{\text{rope}}_t\text{)},\qquad z_t \approx c_t U_r^\top,$$
#
# where $U_r$ comes from the SVD of the stacked weights $[W_k^{\text{nope}}; W_v] = U S V^\top$ (MHA2MLA's
# SVD_joint, so $c_t = x_t V_r S_r$) or from a PCA of the converted model's own keys and values on calibration
# text (TransMLA's choice, after balancing the key and value norms). Partial RoPE sets $\cos = 1$, $\sin = 0$ on
# the dropped pairs, so those key dims reach the cache unrotated and the projection onto a basis computed from
# $W_k$ is exact. Cache per token and layer: $r + 2 n H_{kv}$ numbers instead of $2 H_{kv} D = 384$.

# %%
import json
import time

import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model
from reference_impls.architectures import convert_gqa, convert_mla
from reference_impls.architectures.convert_gqa import pool_kv_heads
from reference_impls.architectures.convert_mla import frequency_pairs, mha2mla, norm_pairs, partial_rope
from reference_impls.data import haystack_sentences
from reference_impls.integration import model_info
from reference_impls.models import tiny_llama

torch.set_num_threads(1)
t_start = time.perf_counter()

# %% [markdown]
# ## Checks: lossless where nothing is dropped, and bytes measured from the held tensors
# On a random 2-layer Llama (4 query heads, 2 KV heads of 16): pooling two *identical* KV heads changes nothing;
# the MLA cache at full rank reproduces the partial-RoPE model exactly; and the bytes `KVCache.nbytes()` sums
# over the tensors the stores hold equal the closed forms.

# %%
tiny = tiny_llama()
ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits_and_cache(model, method, ids, tokenizer=None):
    cache = KVCache(model, method, tokenizer)
    return model(ids, cache=cache).logits.float(), cache


same = pool_kv_heads(tiny, 2)  # a copy (pooling 2 -> 2 is the identity) whose head 1 we make equal to head 0
with torch.no_grad():
    for layer in same.model.layers:
        for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight[16:] = lin.weight[:16]
ref, _ = logits_and_cache(same, Full(), ids)
got, pooled = logits_and_cache(pool_kv_heads(same, 1), Full(), ids)
print(f"equal heads pooled 2 -> 1: max |logit diff| = {float((got - ref).abs().max()):.1e}, "
      f"bytes {pooled.nbytes()} = closed form {convert_gqa.bytes_per_token(2, 1, 16, 4) * 40}")
pairs = frequency_pairs("low", 2, 16, 2)
converted, method = mha2mla(tiny, 2 * 12 + 2 * 16, pairs)  # full rank: 2 x (16 - 4) no-RoPE key + 2 x 16 value dims
ref, _ = logits_and_cache(converted, Full(), ids)
got, mla = logits_and_cache(converted, method, ids)
print(f"MLA cache at full rank vs partial RoPE alone: max |logit diff| = {float((got - ref).abs().max()):.1e}")
for r in (56, 20):
    _, mla = logits_and_cache(*mha2mla(tiny, r, pairs), ids)
    closed = convert_mla.bytes_per_token(2, r, 2, 2, 4) * 40
    assert mla.nbytes() == closed
    print(f"rank {r}: measured {mla.nbytes()} bytes = closed form {closed}")

# %% [markdown]
# ## The same checks on the embedded model, and a first look at what is lost
# SmolLM2-135M in bf16, 512 tokens of standard-library docstrings (tokens 4096 on of `reference_impls.data`'s
# prose; the calibration prefills read its first 1024). Partial RoPE keeps 4 of 32 pairs per head (8 of 64 dims,
# the share MHA2MLA keeps), chosen by S_2-norm; the MLA rank 48 is MHA2MLA's $d_{kv} = 16$ per KV head.

# %%
model, tok = load_model(dtype="bfloat16")
L, H_kv, D = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
text = tok(" ".join(haystack_sentences()), add_special_tokens=False, return_tensors="pt").input_ids
ppl_ids = text[:, 4096:4096 + 512]


def perplexity(model, method):
    logits, cache = logits_and_cache(model, method, ppl_ids, tok)  # the tokenizer: PCA calibrates on docstrings
    nll = -torch.log_softmax(logits[0, :-1], -1).gather(-1, ppl_ids[0, 1:, None]).mean()
    return float(nll.exp()), cache.nbytes() / ppl_ids.shape[1]


pairs = norm_pairs(model_info(model, tok).calibration("stdlib", 1024), 4)
print("S_2-norm pairs of layers 0-4 (0 = fastest, 31 = slowest):", pairs[:5].tolist())
live = {"original": (model, Full()), "GQA 3 -> 1": (pool_kv_heads(model, 1), Full()),
        "partial RoPE (4 pairs)": (partial_rope(model, pairs), Full()),
        "MLA r48, weights SVD (MHA2MLA)": mha2mla(model, 48, pairs),
        "MLA r48, calibration PCA (TransMLA)": mha2mla(model, 48, pairs, basis="pca", balance=True)}
closed = {"original": convert_gqa.bytes_per_token(L, 3, D), "GQA 3 -> 1": convert_gqa.bytes_per_token(L, 1, D),
          "partial RoPE (4 pairs)": convert_gqa.bytes_per_token(L, 3, D)}
print(f"{'':36} {'B/token':>8} {'closed':>7} {'ppl@512':>9}")
for name, (m, meth) in live.items():
    ppl, bpt = perplexity(m, meth)
    c = closed.get(name, convert_mla.bytes_per_token(L, 48, H_kv, 4))
    assert bpt == c
    print(f"{name:36} {bpt:8.0f} {c:7d} {ppl:9.1f}")

# %% [markdown]
# ## Which RoPE pairs to keep? Partial RoPE alone, against the number of pairs kept
# Before any latent, partial RoPE is already a change of the model. S_high keeps the fastest-turning pairs, S_low
# the slowest (with SmolLM2's base of 100000 the slowest pair turns by 0.03 rad over 2k tokens: almost no RoPE),
# S_2-norm the pairs whose query and key norms contribute most to $q \cdot k$.

# %%
calib = model_info(model, tok).calibration("stdlib", 1024)
sweep = {}
for n in (2, 4, 8, 16):
    for strategy in ("high", "low", "2-norm"):
        p = norm_pairs(calib, n) if strategy == "2-norm" else frequency_pairs(strategy, n, D, L)
        sweep[(strategy, n)] = perplexity(partial_rope(model, p), Full())[0]
print(f"{'pairs kept':>10} " + " ".join(f"{s:>8}" for s in ("high", "low", "2-norm")) + "   (perplexity, 512 tokens;"
      f" original {perplexity(model, Full())[0]:.1f})")
for n in (2, 4, 8, 16):
    print(f"{n:10d} " + " ".join(f"{sweep[(s, n)]:8.1f}" for s in ("high", "low", "2-norm")))

# %% [markdown]
# ## The full measurement: bytes per token against perplexity and passkey accuracy
# From `results/architectures/conversions.jsonl`, made by `OMP_NUM_THREADS=1 python scripts/convert_eval.py`
# (bf16, 1 thread; the rows carry their command and commit): perplexity of 2048 tokens of docstrings, and the
# passkey (`passkey_samples`, 10 prompts of ~1k tokens, needle depths 0-100%, query-aware, 16 new tokens). Bytes
# are measured from the cache after the 2048-token prefill. `partial-rope-2norm` and the `mha2mla-*` /
# `transmla-*` rows keep RoPE on 4 S_2-norm pairs, and ranks 96 / 48 / 24 are MHA2MLA's $d_{kv}$ = 32 / 16 / 8
# per KV head (31.25% / 18.75% / 12.5% of the full cache). The `*-high16` rows keep the 16 fastest pairs instead
# (the partial RoPE that loses least in the sweep above): rank 96 is half the full cache, rank 32 exactly the bytes
# of GQA 3 -> 1.

# %%
rows = [json.loads(line) for line in open("results/architectures/conversions.jsonl")]
print(f"{'configuration':20} {'B/token':>8} {'of full':>8} {'ppl@2048':>10} {'passkey':>8}")
for r in rows:
    pk = "-" if r["passkey"] is None else f"{r['passkey']:.1f}"
    print(f"{r['config']:20} {r['kv_bytes_per_token']:8.0f} {r['kv_fraction']:8.3f} {r['ppl']:10.1f} {pk:>8}")
for command, commit in dict.fromkeys((r["command"], r["commit"]) for r in rows):
    print(f"made by: {command}  (commit {commit})")

style = {"none": ("k", "*", "original"), "gqa": ("C3", "s", "GQA mean-pooling"),
         "partial-rope": ("C2", "D", "partial RoPE alone"), "mha2mla": ("C0", "o", "MLA, weights' SVD (MHA2MLA)"),
         "transmla": ("C1", "^", "MLA, calibration PCA (TransMLA-style)")}
fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for r in rows:
    color, marker, _ = style[r["conversion"]]
    for j, key in enumerate(("ppl", "passkey")):
        if r[key] is None:
            continue
        ax[j].scatter(r["kv_bytes_per_token"], r[key], color=color, marker=marker, s=60)
        shown = r["config"] not in ("partial-rope-low", "partial-rope-high") and (key == "ppl" or r[key] > 0)
        if shown:  # labels where they do not pile up (the two strategy ablations are in the table)
            ax[j].annotate(r["config"], (r["kv_bytes_per_token"], r[key]), fontsize=7, xytext=(4, 3),
                           textcoords="offset points")
for color, marker, label in style.values():
    ax[0].scatter([], [], color=color, marker=marker, label=label)
full = next(r for r in rows if r["config"] == "original")
ax[0].axhline(full["ppl"], color="gray", ls=":", lw=1)
ax[0].set_yscale("log"); ax[0].set_ylabel("perplexity, 2048 tokens (log)")
fig.legend(loc="lower center", ncol=5, fontsize=8)
ax[1].set_ylabel("passkey accuracy (10 prompts, ~1k tokens)"); ax[1].set_ylim(-0.05, 1.05)
ax[1].text(3000, 0.05, "every other conversion: 0 / 10", fontsize=8, color="gray")
for a in ax:
    a.set_xscale("log"); a.set_xlabel("KV cache bytes per token (measured, bf16, log)")
fig.suptitle("SmolLM2-135M converted, before any fine-tuning")
plt.tight_layout(rect=(0, 0.07, 1, 1)); plt.show()
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")

# %% [markdown]
# ## What the papers reported, and what we see
# The papers always (up)train after converting, and report the model after that training; we measure only the
# conversion, the starting point they recover from. Their numbers and ours are not the same experiment.
#
# | | paper (after (up)training) | here (SmolLM2-135M, bf16, no training; table above) |
# |---|---|---|
# | GQA (arXiv 2305.13245) | uptraining costs 5% of the original pre-training compute (Abstract); T5-XXL with 8 KV groups, uptrained: average 47.1 vs 47.2 for MHA over 7 datasets, TriviaQA F1 81.6 vs 81.9 (Table 1, v3) | mean-pooling 3 -> 1 KV heads (1/3 of the bytes, measured) breaks the model: perplexity 19717 (original 21.5), passkey 0/10. The averaged heads match none of the query heads' trained keys |
# | MHA2MLA (arXiv 2502.14837) | fine-tuning on 0.6-1% of the pre-training data (Abstract, v2); Llama-2-7B at $d_{kv}$ = 64 (31.25% of the cache): commonsense average 59.51 vs 59.85, LongBench 27.1 vs 27.4; at $d_{kv}$ = 16 (12.5%): 58.96 and 24.4 (Tables 1-2, v1); KV cache 92.19% smaller with about 1% LongBench drop (Abstract, v2) | the same cache fractions (rows `mha2mla-r96` and `mha2mla-r24`) from the weights' SVD alone: perplexity 4070 and 92178, passkey 0/10. Partial RoPE alone (4 pairs, S_2-norm) already gives 303 and 0/10 |
# | TransMLA (arXiv 2502.07864) | KV cache 93% smaller for LLaMA-2-7B, 10.6x faster at 8K context; 6B fine-tuning tokens to recover comparable performance (Abstract, v5). Before training, the official README's Model Zoo (perplexity; the converter's default data set is WikiText-2; commit 9c0d254): Llama-3.2-1B 9.75 original, 16.34 partial RoPE, 16.14 MLA; Llama-2-7B 5.47, 18.64, 41.61 | a PCA of calibration keys and values loses far less than the weights' SVD: 347 / 366 / 399 (rows `transmla-r96`, `-r48`, `-r24`) on top of partial RoPE's 303. With RoPE on the 16 fastest pairs: 44 for partial RoPE alone, 84 at half the cache, 230 at GQA 3 -> 1's bytes (vs 19717 for pooling). Passkey 0/10 for every conversion (1/10 for partial RoPE on 16 pairs) |
#
# What this says: (1) at equal bytes, an MLA latent fitted to the model's own keys and values is a far better
# starting point than mean-pooled heads or a latent fitted to the weights alone (the weights ignore which input
# directions the layer actually sees); (2) before training, partial RoPE is the larger loss, and which pairs keep
# RoPE matters (here the fastest pairs: with a RoPE base of 100000 the slowest pairs barely turn, so their RoPE
# carries little); (3) no conversion keeps passkey retrieval without training on this 135M model. Every paper
# recovers its loss with (up)training, which this notebook does not do (no fine-tuning on CPU).
