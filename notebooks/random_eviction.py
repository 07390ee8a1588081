# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Random eviction: the floor
#
# **What you will learn:** what keeping a uniformly random subset of the tokens costs, the baseline every
# scored eviction method has to beat (kvpress ships it as `RandomPress`). Each layer and KV head keeps
# $b = \mathrm{round}(n / r)$ tokens drawn without replacement:
#
# $$S_h \sim \text{Uniform}\{S \subseteq \{0,\dots,n-1\} : |S| = b\},$$
#
# so a needle of $m$ tokens survives whole in one head with probability
# $\binom{n-m}{b-m}/\binom{n}{b} \approx r^{-m}$.

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from reference_impls import KVCache, load_model
from reference_impls.eviction import RandomEviction

model, tok = load_model()

# %% [markdown]
# ## A check: seeded, repeatable, uniform over positions

# %%
ids = torch.randint(100, 5000, (1, 400), generator=torch.Generator().manual_seed(0))
kept = {}
for seed in (0, 0, 1):
    cache = KVCache(model, RandomEviction(budget=100, seed=seed))
    with torch.no_grad():
        model(ids, cache=cache)
    kept.setdefault(seed, []).append(torch.cat([l.store.kept_slots()[0] for l in cache.layers]))  # (L*H_kv, 100)
assert torch.equal(kept[0][0], kept[0][1]) and not torch.equal(kept[0][0], kept[1][0])
all_kept = kept[0][0].flatten()
plt.hist(all_kept.numpy(), bins=20, range=(0, 400))
plt.xlabel("position"); plt.ylabel("kept (all layers and heads)"); plt.title("kept positions, budget 100 of 400")
plt.show()
print(f"mean kept position {all_kept.float().mean():.1f} (uniform: 199.5)")

# %% [markdown]
# ## Accuracy against compression on the passkey task
# From the evidence run (`scripts/evidence.py --methods random`, ~1.5k-token passkey prompts, needle depths
# 0-100%, both settings); ratios are measured from the bytes held.

# %%
from reference_impls.report import show_evidence

show_evidence("results/eviction/random.json", "Random eviction on SmolLM2-135M")

# %% [markdown]
# ## Beside the scored methods
# Every method's JSON found under `results/eviction/` is drawn, one panel per setting, random in bold.

# %%
results = sorted(Path("results/eviction").glob("*.json"))
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for path in results:
    data = json.loads(path.read_text())
    for i, setting in enumerate(("query-agnostic", "query-aware")):
        rs = [r for r in data["summary"] if r["setting"] == setting]
        if rs:
            ax[i].plot([r["achieved_ratio"] for r in rs], [r["accuracy"] for r in rs], "o-", label=path.stem,
                       lw=3 if path.stem == "random" else 1)
for i, setting in enumerate(("query-agnostic", "query-aware")):
    ax[i].set_xscale("log"); ax[i].set_xlabel("achieved compression ratio"); ax[i].set_title(setting)
ax[0].set_ylabel("passkey accuracy"); ax[1].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## What others reported, and what we see
# | | elsewhere | here (SmolLM2-135M, CPU) |
# |---|---|---|
# | random | kvpress ships RandomPress as the baseline of its benchmark; we did not take numbers from it | see the plot: the needle's tokens must survive in the heads that read them, which gets unlikely quickly as the ratio grows |
