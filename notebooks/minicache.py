# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # MiniCache: do adjacent layers hold the same keys and values?
#
# **What you will learn:** MiniCache (Liu et al., arXiv 2405.14366) observes that from the middle of the
# network on, two adjacent layers' key and value states point in nearly the same directions. So each pair of
# layers (l-1, l) keeps one shared direction per token, plus each layer's own length, and a few token pairs that
# are too far apart stay unmerged. We check the implementation, then measure the observation on the embedded
# SmolLM2-135M: here it does **not** hold, and merging from the middle breaks the passkey task.
#
# For a token's states $x^{l-1}, x^{l}$ (one KV head, keys and values apart), with $\Omega$ the angle between them
# (Eq. 3, SLERP with $t = 0.6$; Eq. 2, restoration):
#
# $$e = \frac{\sin((1-t)\Omega)}{\sin\Omega}\,\frac{x^{l-1}}{\lVert x^{l-1}\rVert}
#     + \frac{\sin(t\Omega)}{\sin\Omega}\,\frac{x^{l}}{\lVert x^{l}\rVert}, \qquad
# \hat x^{l-1} = \lVert x^{l-1}\rVert\, e, \quad \hat x^{l} = \lVert x^{l}\rVert\, e .$$
#
# A pair is retained unmerged when its angular distance $d = \Omega/\pi$ lies in the top $\gamma = 0.05$ of its
# row's range, $d \ge d_{\min} + (1-\gamma)(d_{\max} - d_{\min})$ (our reading of the paper's rule; see the
# module's Deviations). Merging starts at layer $S = L/2$; the pair's second layer holds the shared directions.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from reference_impls import KVCache, MiniCache, load_model
from reference_impls.calibration import calibration_ids
from reference_impls.crosslayer.minicache import minicache_merge, minicache_restore
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.integration import model_info
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()
L = model.config.num_hidden_layers

# %% [markdown]
# ## A check: merged tokens come back as length x shared direction, retained ones exactly
# On random states of SmolLM2's shape (3 KV heads, D = 64), then on the embedded model: a 300-token prompt,
# layers 15 and 16 form the first pair (S = 30/2); the second layer holds the shared directions once.

# %%
g = torch.Generator().manual_seed(0)
xp, x = torch.randn(1, 3, 200, 64, generator=g), torch.randn(1, 3, 200, 64, generator=g)
e, mp, ml, kept = minicache_merge(xp, x, t=0.6, gamma=0.05)
idx = kept.flatten().nonzero()[:, 0]
restored = minicache_restore(e, ml, idx, x.reshape(-1, 64)[idx])
assert torch.equal(restored[kept], x[kept]) and torch.allclose(restored.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
cos = F.cosine_similarity(restored, x, dim=-1)
print(f"retained {int(kept.sum())} of {kept.numel()} pairs (error 0); merged tokens keep their length, "
      f"direction cosine to the original {cos[~kept].mean():.2f} (random states are ~orthogonal)")

cache = KVCache(model, MiniCache())
with torch.no_grad():
    model(torch.randint(100, 5000, (1, 300), generator=g), cache=cache)
for i in (14, 15, 16):
    s = cache.layers[i].store
    print(f"layer {i}: {type(s).__name__:10s} {s.nbytes():8d} bytes")
dense = 2 * 3 * 300 * 64 * 4  # K and V of one fp32 layer
first, second = cache.layers[15].store, cache.layers[16].store
assert second.nbytes() - first.nbytes() == dense + 4 * sum(i.numel() for i in second.idx)  # directions + indices
print(f"whole cache: {cache.full_nbytes() / cache.nbytes():.2f}x smaller than the full cache in the same dtype")

# %% [markdown]
# ## The paper's observation in miniature: how alike are adjacent layers?
# One prefill of 512 tokens of standard-library prose (`Model.calibration`); for every adjacent pair, the cosine
# similarity of the two layers' key (and value) vectors of the same token and head, averaged over tokens and
# heads. Beside it, the similarity of the hidden states entering the two layers (the residual stream).

# %%
steps = model_info(model, tok).calibration("stdlib", 512)
kcos = [float(F.cosine_similarity(steps[i].keys, steps[i - 1].keys, dim=-1).mean()) for i in range(1, L)]
vcos = [float(F.cosine_similarity(steps[i].values, steps[i - 1].values, dim=-1).mean()) for i in range(1, L)]
with torch.no_grad():
    hidden = model(calibration_ids("stdlib", 512, tok), output_hidden_states=True).hidden_states
hcos = [float(F.cosine_similarity(hidden[i], hidden[i - 1], dim=-1).mean()) for i in range(1, L)]  # inputs of l-1, l
plt.figure(figsize=(8, 3.6))
plt.plot(range(1, L), kcos, "o-", label="keys")
plt.plot(range(1, L), vcos, "s-", label="values")
plt.plot(range(1, L), hcos, "^-", label="hidden states (input of the layer)")
plt.axvline(L // 2, color="gray", ls=":", label="S = L/2")
plt.xlabel("layer l (pair l-1, l)"); plt.ylabel("mean cosine similarity"); plt.ylim(-0.35, 1.05); plt.legend()
plt.title("SmolLM2-135M: adjacent layers, same token and head"); plt.tight_layout(); plt.show()
deep = slice(L // 2 - 1, None)  # the pairs from layer S = L/2 on
print(f"from layer {L // 2} on: keys {torch.tensor(kcos[deep]).mean():.3f}, values {torch.tensor(vcos[deep]).mean():.3f}, "
      f"hidden states {min(hcos[deep]):.2f} or more")

# %% [markdown]
# The paper's Figure 1(a) (LLaMA-3-70B on COQA, GSM8K, TruthfulQA) shows the adjacent-layer similarity of the
# KV cache rising from ~0.2-0.3 in the first layers to ~0.8-0.9 from the middle of the network on, and its
# Figure 2(b) per-token similarities around 0.6 with a few outlier tokens. On SmolLM2-135M the residual stream is
# indeed alike between adjacent layers, but each layer projects it with its own $W_K$, $W_V$: the per-token key
# and value directions of adjacent layers are close to orthogonal at every depth. The observation MiniCache rests
# on is a property of the model, and this one does not have it.
#
# ## What merging does here: passkey answers against the number of layers merged
# Three passkey prompts (~800 tokens, needle depths 20/50/80%), one prefill each, replayed into MiniCache with
# merging starting later or earlier (the paper's Figure 1(b) varies the number of merged layers the same way),
# and the retention threshold varied at S = L/2. Ratios count against the full cache in the same dtype.

# %%
eos = eos_ids(model, tok)
samples = passkey_samples(3, 800, seed=5, tokenizer=tok, depths=[0.2, 0.5, 0.8])
records = []
for s in samples:
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    records.append((record_prefill(model, torch.cat([ctx, qst], 1)), s["answer"]))

configs = [MiniCache(start=st) for st in (1.0, 0.9, 0.8, 2 / 3, 0.5, 0.0)]
configs += [MiniCache(gamma=gm) for gm in (0.0, 0.5, 1.0)]
rows = []
for m in configs:
    hits, ratio = 0, 0.0
    for rec, answer in records:
        c = cache_from_record(model, m, rec)
        out = tok.decode(greedy_generate(model, c, [], 8, eos, logits=rec.logits).tokens, skip_special_tokens=True)
        hits += answer in out
        ratio += c.full_nbytes() / c.nbytes() / len(records)
    rows.append((m, len(m.pairs(L)), hits, ratio))
print(f"{'start':>6} {'gamma':>6} {'layers merged':>13} {'passkeys':>8} {'ratio':>6}")
for m, merged, hits, ratio in rows:
    print(f"{m.start:6.2f} {m.gamma:6.2f} {merged:13d} {hits:6d}/3 {ratio:6.2f}")
print(f"S = L/2 merges {len(MiniCache().pairs(L)) // 2} pairs of the {L} layers. from_ratio's KIVI options, nominal "
      "ratio (`nominal_ratio`, 16-bit unit): "
      + ", ".join(f"KIVI-{b} {MiniCache(bits=b).nominal_ratio():.1f}x" for b in (8, 4, 2))
      + f", KIVI-2 merging every layer {MiniCache(start=0.0, bits=2).nominal_ratio():.1f}x")
plt.figure(figsize=(6, 3.2))
plt.plot([r[1] for r in rows[:6]], [r[2] for r in rows[:6]], "o-")
plt.xlabel("layers merged (from the top down)"); plt.ylabel("passkeys found (of 3)")
plt.title("MiniCache on SmolLM2-135M, gamma = 0.05"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (LLaMA-2/3, Phi-3, Mistral, Mixtral; 7B-70B) | here (SmolLM2-135M, fp32 on CPU) |
# |---|---|---|
# | observation | adjacent layers' KV states are highly similar from the middle depth on (~0.8-0.9 on LLaMA-3-70B, Figure 1(a)) | mean per-token cosine of adjacent layers' keys and values is ~0 at every depth (-0.02 and -0.00 from layer 15 on), although the hidden states entering them are alike (0.86 or more) |
# | merging from S = L/2 | near-lossless (Figure 1(b): LLaMA-3-70B keeps its GSM8K score until about half the layers are merged) | the passkey survives merging the last 2 or 6 layers (3/3) and is lost from 10 merged layers on, S = L/2 (14 layers) included (0/3) |
# | compression | 1.53x from merging alone (LLaMA-2-7B, ShareGPT); up to 5.02x with 4-bit KIVI (abstract) | 1.29x at S = L/2 with gamma = 0.05 (7 pairs of 30 layers, D = 64), 1.91x merging every layer; `MiniCache.from_ratio` reaches 2.2x to 7.2x (nominal, printed above) by storing the cache as KIVI-8/4/2 |
# | retention | gamma = 0.05 balances accuracy and compression (ablation) | retention cannot repair merges of unrelated directions: gamma = 0.5 keeps half the pairs, holds about as much as the full cache (0.98x) and still loses the passkey; gamma = 1 is exact but holds more than the full cache (0.81x) |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("minicache")
