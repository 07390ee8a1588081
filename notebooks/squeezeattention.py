# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # SqueezeAttention: less cache where attention changes little
#
# **What you will learn:** SqueezeAttention (Wang, Cui, Gan, arXiv 2404.04793) allocates the cache across *layers*.
# For each layer it measures how much self-attention changes the tokens: the cosine similarity between a token's
# hidden state before the attention block and after it (residual added), averaged over the prompt. Layers are
# clustered by k-means into 3 groups; the group of highest similarity (attention matters least) keeps a fraction p
# of the uniform budget, the other layers share what it frees, and a token policy (H2O, StreamingLLM, a sliding
# window) evicts inside each layer. We check the allocation, plot the similarity by depth on the embedded
# SmolLM2-135M with the groups k-means finds, and compare H2O with and without the layer budgets on passkeys.
#
# $$I_\ell = \frac{1}{n}\sum_{t} \cos\big(x^\ell_t,\; x^\ell_t + \mathrm{Attn}_\ell(x^\ell)_t\big), \qquad
# B_\ell = \begin{cases} p\,b & \ell \in G_{\mathrm{low}} \text{ (highest } I\text{)}\\
# \dfrac{L\,b - |G_{\mathrm{low}}|\,p\,b}{L - |G_{\mathrm{low}}|} & \text{otherwise,}\end{cases}$$
#
# with $b = n / \text{ratio}$ the uniform budget, so the total $\sum_\ell B_\ell = L\,b$ does not change.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import KVCache, load_model
from reference_impls.data import passkey_samples
from reference_impls.evaluate import evaluate, summarize
from reference_impls.eviction import H2O, SqueezeAttention
from reference_impls.eviction.policies import kmeans_1d, squeeze_budgets
from reference_impls.eviction.squeezeattention import attention_similarity
from reference_impls.generation import build_prompt
from reference_impls.integration import model_info

model, tok = load_model()
L = model.config.num_hidden_layers
info = model_info(model, tok)

# %% [markdown]
# ## A check: each layer keeps its share, and the shares add up to the uniform total
# A ~300-token prompt at 4x: the layers' kept counts are `squeeze_budgets` of the similarities measured on
# the prompt, they sum to L b, and the least-changed group keeps p b ≈ 0.38 b tokens per head (a layer whose share
# reaches the prompt keeps it whole).

# %%
s = passkey_samples(1, 300, seed=3, tokenizer=tok)[0]
ctx, _ = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
n = ctx.shape[1]
cache = KVCache(model, SqueezeAttention(ratio=4), tok)
with torch.no_grad():
    model(ctx, cache=cache)
kept = [n if layer.store.kept_slots() is None else layer.store.kept_slots().shape[-1] for layer in cache.layers]
sim = torch.stack([attention_similarity(*st.hidden)[0] for st in info.trace(ctx)])[None]
want = squeeze_budgets(sim, torch.tensor([n]), torch.tensor([round(n / 4)]), 0.38)[0].tolist()
assert kept == want and sum(kept) == L * round(n / 4)
print(f"n = {n}, b = {round(n / 4)}: per-layer budgets {kept}")

# %% [markdown]
# ## The paper's observation in miniature: attention's effect differs by depth, and k-means finds the groups
# Three ~1k-token prompts (passkey prompts of standard-library prose): the similarity of every layer, coloured by the
# k-means group of the first prompt, and the budgets that result at 4x.

# %%
prompts = [build_prompt(tok, x["context"], x["question"], x["answer_prefix"])
           for x in passkey_samples(3, 1000, seed=7, tokenizer=tok)]
sims = torch.stack([torch.stack([attention_similarity(*st.hidden)[0] for st in info.trace(torch.cat(p, 1))])
                    for p in prompts])  # (3, L)
groups = kmeans_1d(sims[0], 3)
n0 = sum(x.shape[1] for x in prompts[0])
budgets = squeeze_budgets(sims[:1], torch.tensor([n0]), torch.tensor([round(n0 / 4)]), 0.38)[0]
fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
for i, srow in enumerate(sims):
    ax[0].plot(srow, "-", color="gray", alpha=0.4 + 0.2 * i, label=f"prompt {i}")
colors = ["tab:red", "tab:orange", "tab:blue"]
for g in range(3):
    idx = torch.nonzero(groups == g).flatten()
    ax[0].scatter(idx, sims[0, idx], color=colors[g], zorder=3,
                  label=["most changed", "middle", "least changed (keeps p b)"][g])
ax[0].set_xlabel("layer"); ax[0].set_ylabel("cos(x, x + attn(x)), mean over tokens"); ax[0].legend(fontsize=8)
ax[0].set_title("how little attention changes the hidden states")
ax[1].bar(range(L), budgets, color=[colors[int(g)] for g in groups])
ax[1].axhline(round(n0 / 4), color="gray", ls=":", label="uniform b (4x)")
ax[1].set_xlabel("layer"); ax[1].set_ylabel("tokens kept per head"); ax[1].legend()
ax[1].set_title("SqueezeAttention budgets at 4x, prompt 0")
plt.tight_layout(); plt.show()
for g, name in enumerate(["most changed", "middle", "least changed"]):
    print(f"{name:14}: layers {torch.nonzero(groups == g).flatten().tolist()}")
print("same groups for the 3 prompts:", all(torch.equal(kmeans_1d(r, 3), groups) for r in sims))
print("similarity of prompt 0 by layer:", [round(float(x), 3) for x in sims[0]])
print(f"budgets at 4x (n = {n0}, b = {round(n0 / 4)}):", budgets.tolist())

# %% [markdown]
# ## H2O with and without the layer budgets on passkeys
# Three ~1k-token prompts, query-aware (context and question compressed together), 4x and 8x; memory is the same
# for both rows of a ratio (the achieved ratio is measured from the bytes held).

# %%
samples = passkey_samples(3, 1000, seed=0, tokenizer=tok)
res = evaluate(model, tok, {"squeeze+h2o": SqueezeAttention.from_ratio, "h2o": H2O.from_ratio}, [4, 8], samples,
               settings=["query-aware"])
unit = next(model.parameters()).element_size() / 2  # fp32 model on CPU: achieved against an fp32 full cache
print(f"{'method':12} {'ratio':>5} {'accuracy':>8} {'achieved':>8}")
for r in summarize(res):
    print(f"{r['method']:12} {r['target_ratio']:5g} {r['accuracy']:8.2f} {r['achieved_ratio'] * unit:8.2f}")

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper / official code (Mistral-7B, Llama-2-7B/70B, Falcon, ...) | here (SmolLM2-135M, ~1k tokens, CPU) |
# |---|---|---|
# | observation | layers differ in how much attention changes the tokens (abstract); the official README expects the reduced group ("class 3") to be "probably" the second half of the layers, and its overview figure draws the first layers and the last one with the larger budgets | SmolLM2's attention changes the tokens most in layer 0, then layers 1 and 24; k-means puts the other 27 layers in the least-changed group, the same groups for all 3 prompts (printed above): a lopsided split, not halves |
# | allocation | 3 k-means groups; the reduced group keeps p of the budget (README examples: 0.08/0.21 ≈ 0.38 for Mistral-7B on samsum, 0.25/0.4 for Llama-2-7B-32K on xsum) | p = 0.38; the 3 important layers would get more than the whole prompt, so they keep all of it and the excess returns to the 27 others (budgets printed above); the total equals uniform eviction's (checked above) |
# | result | 30-70% KV memory reduction and up to 2.2x throughput across models and benchmarks (abstract) | at equal memory the layer budgets hurt H2O here: 2/3 vs 3/3 passkeys at 4x, 0/3 vs 2/3 at 8x (3 prompts, query-aware; a smoke test, not a benchmark), with 27 layers squeezed below b |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("squeezeattention")
