# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # KVMerger: neighbouring keys look alike, so merge them
#
# **What you will learn:** KVMerger (Wang et al., arXiv 2407.08454) observes that within one head, adjacent
# tokens' keys are very similar, and that how much they are is a property of the model more than of the text.
# It groups runs of consecutive similar keys into *merging sets* (Algorithm 1: walk the sequence, a token joins
# its neighbour's set while their keys' cosine similarity stays above a threshold) and collapses each set into its
# most attended token, the *pivot*, with Gaussian-kernel weights. We check the implementation, reproduce the
# observation on SmolLM2-135M, and compare merging a set with keeping its pivot alone.
#
# For a merging set $S$ with pivot $p = \arg\max_{i\in S} a_i$ (aggregated attention):
#
# $$g_i = \exp\!\Big(-\frac{\lVert k_i - k_p\rVert^2}{2\sigma^2}\Big),\quad w_i = \frac{g_i}{\sum_{j\in S} g_j},\quad
#   k_p \leftarrow \sum_{i\in S} w_i k_i,\quad v_p \leftarrow \sum_{i\in S} w_i v_i .$$
#
# Here the budget sets the threshold per head: the $b-1$ least similar adjacent pairs split a head into $b$ sets
# (`heads="threshold"` gives the paper's fixed threshold).

# %%
import inspect
import json.decoder
import textwrap

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from reference_impls import Full, KVCache, load_model
from reference_impls.data import passkey_samples
from reference_impls.eviction import EvictionMethod, H2O
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.integration import model_info
from reference_impls.merging import KVMerger
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()
L = model.config.num_hidden_layers

# %% [markdown]
# ## A check: one pivot per set, merged states inside their set
# Budget 48 on a 300-token prompt: every layer and head keeps 48 tokens; each kept key is a weighted mean of the
# keys of a run of consecutive tokens around it, so it lies inside their range. The variant `PivotsOnly` (the
# same kept tokens, `merge` left at the default) drops the rest instead.


# %%
class PivotsOnly(KVMerger):
    """KVMerger's pivots, the other tokens of each set dropped (EvictionMethod's default merge)."""

    merge = EvictionMethod.merge


ids = torch.randint(100, 5000, (1, 300), generator=torch.Generator().manual_seed(0))
merged, pivots = KVCache(model, KVMerger(budget=48)), KVCache(model, PivotsOnly(budget=48))
with torch.no_grad():
    model(ids, cache=merged)
    model(ids, cache=pivots)
layer = merged.layers[12].store
kept = layer.kept_slots()[0, 0].tolist()
assert layer.kept_slots().shape == (1, 3, 48)
assert torch.equal(merged.layers[0].store.kept_slots(), pivots.layers[0].store.kept_slots())
print("layer 12, head 0 pivots:", kept[:16], "...")
print("relative change of the kept keys by merging, layer 0:",
      f"{float((merged.layers[0].store.k - pivots.layers[0].store.k).norm() / pivots.layers[0].store.k.norm()):.3f}")

# %% [markdown]
# ## The paper's observation in miniature: adjacent keys are alike, in every text
# Per layer, the mean cosine similarity of each key with the next one (adjacent) against pairs 64+ tokens apart,
# on a passkey context (prose) and on Python source code; and the share of adjacent pairs above 0.8 (what a fixed
# threshold of 0.8 would merge), for both texts.

# %%
texts = {"passkey context": passkey_samples(1, 1000, seed=2, tokenizer=tok)[0]["context"],
         "Python source": inspect.getsource(textwrap) + inspect.getsource(json.decoder)}
adjacent, far, share = {}, {}, {}
records = {}
for name, text in texts.items():
    ids = tok(text, return_tensors="pt").input_ids[:, :1000]
    rec = records[name] = record_prefill(model, ids)
    a, f, s = [], [], []
    for k in rec.keys:
        kn = F.normalize(k[0].float(), dim=-1)  # (H_kv, T, D)
        adj = (kn[:, 1:] * kn[:, :-1]).sum(-1)
        a.append(float(adj.mean()))
        f.append(float((kn[:, 64:] * kn[:, :-64]).sum(-1).mean()))
        s.append(float((adj > 0.8).float().mean()))
    adjacent[name], far[name], share[name] = a, f, s

fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
for name, style in zip(texts, ("C0", "C1")):
    ax[0].plot(adjacent[name], style + "o-", ms=3, label=f"adjacent, {name}")
    ax[0].plot(far[name], style + "--", label=f"64 apart, {name}")
    ax[1].plot(share[name], style + "o-", ms=3, label=name)
ax[0].set_xlabel("layer"); ax[0].set_ylabel("mean cosine similarity of keys"); ax[0].legend(fontsize=7)
ax[1].set_xlabel("layer"); ax[1].set_ylabel("adjacent pairs with cos > 0.8"); ax[1].legend(fontsize=8)
ax[1].set_title("what a fixed threshold would merge")
k = F.normalize(records["passkey context"].keys[12][0, 0, :96].float(), dim=-1)
im = ax[2].imshow(k @ k.T, cmap="viridis", vmin=-0.2, vmax=1)
ax[2].set_title("layer 12, head 0: cos(k_i, k_j), first 96 tokens"); plt.colorbar(im, ax=ax[2])
plt.tight_layout(); plt.show()
for name in texts:
    print(f"{name:>15}: adjacent {sum(adjacent[name]) / L:.2f} vs 64 apart {sum(far[name]) / L:.2f} (mean over layers)")
gap = sum(abs(x - y) for x, y in zip(*share.values())) / L
print(f"share of adjacent pairs above 0.8: mean |difference| between the two texts {gap:.3f} per layer")

# %% [markdown]
# ## Merging against keeping the pivots alone, and against H2O
# The passkey context (query-agnostic: the context alone is compressed), then the question and answer prefix:
# the KL divergence of the next-token distributions from the full cache's, at the same number of kept tokens.

# %%
s = passkey_samples(1, 1000, seed=2, tokenizer=tok)[0]
ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
rec = record_prefill(model, ctx)
RATIOS = (2, 4, 8)
METHODS = {"KVMerger": KVMerger, "pivots only": PivotsOnly, "H2O": H2O}
kl = {name: [] for name in METHODS}
with torch.no_grad():
    ref = F.log_softmax(model(qst, cache=cache_from_record(model, Full(), rec)).logits[0].float(), -1)
    for name, cls in METHODS.items():
        for ratio in RATIOS:
            out = F.log_softmax(model(qst, cache=cache_from_record(model, cls(ratio=ratio), rec)).logits[0].float(), -1)
            kl[name].append(float(F.kl_div(out, ref, log_target=True, reduction="batchmean")))
print(f"{'method':>12} " + " ".join(f"{'KL x' + str(r):>9}" for r in RATIOS))
for name in METHODS:
    print(f"{name:>12} " + " ".join(f"{x:9.4f}" for x in kl[name]))

# %% [markdown]
# ## Why KVMerger scores 0 on the passkey benchmark
# The benchmark (`results/bench/passkey-families-30.jsonl`, 30 prompts of 1k tokens, bf16) gives KVMerger 2/30 at
# 2x query-aware and 1/30 query-agnostic, and 0/30 at 4x and 8x in both settings, where the other merging methods
# reach 0.50 (CaM) and 0.93 (D2O) at 2x query-aware.
# The passkey is five digits, one token each, written twice in the needle. Digits have alike keys, so adjacent
# digits are among the most similar neighbours of the prompt and the budget's threshold puts them in one merging
# set: one state is left for several digits, and their values, which say *which* digit, are averaged (or dropped:
# keeping the pivots alone fails the same way). Below, on the benchmark's first 3 query-aware prompts (fp32 here):
# per layer, the share of the adjacent pairs inside the passkey that the 2x split merges (half of all pairs are
# merged, by construction), from the cached (post-RoPE) keys and from the keys with RoPE undone; then the answers at
# 2x of KVMerger, its pivots alone, H2O, and KVMerger with the passkey's 10 digit tokens forced to be pivots (each
# its own set, the budget unchanged: an oracle, for the diagnosis only).

# %%
rot = lambda x: torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], -1)  # noqa: E731 rotate_half
merged_share = {"post-RoPE (cached)": torch.zeros(L), "RoPE undone": torch.zeros(L)}
prompts = []
for p in passkey_samples(3, 1000, seed=0, tokenizer=tok):  # the benchmark's prompts (seed 0)
    full_ids = torch.cat(build_prompt(tok, p["context"], p["question"], p["answer_prefix"]), 1)
    pieces = [tok.decode([i]) for i in full_ids[0].tolist()]
    T = len(pieces)
    starts = [i for i in range(T - 4) if "".join(pieces[i:i + 5]) == p["answer"]]
    digits = torch.tensor([i + j for i in starts for j in range(5)])
    in_key = [i + j for i in starts for j in range(4)]  # the pairs (t, t + 1) inside the passkey
    r = record_prefill(model, full_ids)
    prompts.append((p["answer"], digits, r))
    cos, sin = model_info(model).rope(torch.arange(T)[None])
    for layer, k in enumerate(r.keys):
        k = k[0].float()  # (H_kv, T, D)
        for name, kk in (("post-RoPE (cached)", k), ("RoPE undone", k * cos[0] - rot(k) * sin[0])):
            sim = F.cosine_similarity(kk[:, :-1], kk[:, 1:], dim=-1)  # (H_kv, T - 1)
            rank = sim.argsort(-1).argsort(-1)  # 0 = least similar pair
            merged = rank >= round(T / 2) - 1  # 2x: the b - 1 least similar pairs split a head into b sets
            merged_share[name][layer] += float(merged[:, in_key].float().mean()) / 3
plt.figure(figsize=(7, 3.2))
for name, style in zip(merged_share, ("o-", "s--")):
    plt.plot(merged_share[name], style, ms=3, label=name)
plt.axhline(0.5, color="gray", ls=":", label="all adjacent pairs")
plt.xlabel("layer"); plt.ylabel("passkey digit pairs merged at 2x"); plt.ylim(0, 1.05); plt.legend(fontsize=8)
plt.tight_layout(); plt.show()
for name, x in merged_share.items():
    print(f"{name:>18}: {float(x.mean()):.2f} of the passkey's adjacent pairs merged at 2x (mean over layers)")

DIGITS = torch.tensor([], dtype=torch.long)  # the current prompt's digit positions, for the oracle


class DigitsKept(KVMerger):
    """Diagnostic oracle: KVMerger whose merging sets never join two of the passkey's digit tokens."""

    def score(self, step, history, budget):
        return super().score(step, history, budget).masked_fill(torch.isin(step.positions, DIGITS), 10.0)


eos = eos_ids(model, tok)
for answer, DIGITS, r in prompts:
    out = []
    for name, cls in (("KVMerger", KVMerger), ("pivots only", PivotsOnly), ("H2O", H2O), ("digits kept", DigitsKept)):
        gen = greedy_generate(model, cache_from_record(model, cls(ratio=2), r, tok), [], 8, eos, logits=r.logits)
        out.append(f"{name} {tok.decode([t for t in gen.tokens if t not in eos]).strip()!r}")
    print(f"passkey {answer}, 2x: " + ", ".join(out))

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (Llama2-7B/13B-chat; LongBench, ZeroScrolls) | here (SmolLM2-135M, CPU) |
# |---|---|---|
# | observation 1 | key states are highly similar at the token level within a sequence, adjacent tokens most | adjacent keys: mean cosine 0.84 against 0.63-0.65 for keys 64 tokens apart (mean over layers; per layer in the plot); the similarity matrix of a head shows the band along the diagonal |
# | observation 2 | this similarity (the sparsity merging exploits) is independent of the dataset, persistent at the model level | the share of adjacent pairs above 0.8 per layer differs by 0.024 on average between prose and Python source |
# | passkey retrieval | not evaluated (LongBench, ZeroScrolls) | the benchmark scores it 0.07 (2/30) at 2x query-aware, 0.03 query-agnostic and zero at 4x and 8x in both settings (`results/bench/passkey-families-30.jsonl`, 30 prompts, bf16): the passkey's adjacent digits are merged far more often than other neighbours (plot and shares printed above; the same with RoPE undone, so not a positional artefact). On the first three prompts at 2x (printed above), KVMerger and its pivots alone garble every passkey, H2O answers all three, and the digits-kept oracle, which only keeps the digit tokens apart, brings the digits back |
# | merging | better than H2O and CaM at 50% and 35% KV budgets (abstract; the tables could not be read here) | on one passkey prompt, merging each set raises the next-token KL from the full cache over keeping its pivot alone (0.25 vs 0.18 at 2x, 0.69 vs 0.49 at 4x, 0.69 vs 0.58 at 8x), and both stay above H2O (0.09, 0.29, 0.35) |
#
# A merged key stands for the whole set but is attended to once, and averaging keys of different directions
# shortens it; the paper's models are 50 to 100 times larger and its budgets (50%, 35%) milder than 4x or 8x.
# The passkey failure is the method's premise meeting a string of digits: tokens whose keys are alike are
# merged, but what tells the digits apart lives in their values. It is not a bug of this implementation (the
# pivots and merged states equal Algorithm 1 in the tests; protecting the first 4 and last 32 tokens changes
# nothing). Measured once outside this notebook (10 prompts, bf16, query-aware): the digits-kept oracle answers
# 10/10 at 2x and 4x and 3/10 at 8x, KVMerger 0/10 at each, H2O 9/10, 7/10 and 2/10.
# The paper's fixed threshold does no better (3 prompts, bf16, measured once outside this notebook):
# tau = 0.9 compresses 1.5x and joins 78% of the passkey's adjacent digit pairs, tau = 0.8 compresses 4.3x and
# joins 92%; only tau = 0.95 (1.05x) keeps half of them apart.

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("kvmerger")
