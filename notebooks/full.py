# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # The full cache: the baseline every method is measured against
#
# **What you will learn:** how much memory an uncompressed KV cache takes, how kvatlas measures it (from the
# tensors actually held, never from a formula alone), and how well the embedded model answers the passkey
# task with nothing compressed — the ceiling for every other notebook.
#
# A decoder caches, for every layer $\ell$ and every past token, one key and one value per key-value head:
#
# $$\text{bytes} = 2 \cdot L \cdot B \cdot H_{kv} \cdot T \cdot D \cdot \text{bytes per element}$$
#
# SmolLM2-135M has $L=30$ layers, $H_{kv}=3$ key-value heads (grouped-query attention, 9 query heads) and
# $D=64$, so each token costs $2 \cdot 30 \cdot 3 \cdot 64 = 11{,}520$ elements.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model, run_sample
from reference_impls.data import is_correct, passkey_samples

model, tok = load_model()
_ = torch.manual_seed(0)  # the random test inputs below: the same on every run
cfg = model.config
print(f"layers={cfg.num_hidden_layers} kv_heads={cfg.num_key_value_heads} head_dim={cfg.head_dim} dtype={model.dtype}")

# %% [markdown]
# ## Measured bytes equal the formula
# The cache holds real tensors; `KVCache.nbytes()` sums their sizes. For the full cache this must equal the
# formula above — a check, not an assumption.

# %%
lengths = [64, 256, 1024]
measured, formula = [], []
for T in lengths:
    cache = KVCache(model, Full())
    with torch.no_grad():
        model(torch.randint(100, 5000, (1, T)), cache=cache)
    measured.append(cache.nbytes())
    formula.append(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * T * cfg.head_dim * model.dtype.itemsize)
    assert measured[-1] == formula[-1]
for T, m in zip(lengths, measured):
    print(f"T={T:5d}: {m / 2**20:7.2f} MiB ({m // T} bytes per token)")

# %%
plt.figure(figsize=(5, 3))
plt.plot(lengths, [m / 2**20 for m in measured], "o-", label="measured (held tensors)")
plt.plot(lengths, [f / 2**20 for f in formula], "x--", label="formula")
plt.xlabel("tokens"); plt.ylabel("MiB"); plt.title("Full KV cache of SmolLM2-135M (fp32)"); plt.legend()
plt.show()

# %% [markdown]
# ## The ceiling: passkey retrieval with nothing compressed
# Eight prompts of about 1,000 tokens (standard-library prose, a 5-digit passkey at depths from 0 to 100%).

# %%
samples = passkey_samples(8, 1000, seed=0, tokenizer=tok)
rows = []
for s in samples:
    r = run_sample(model, tok, Full(), s["context"], s["question"], answer_prefix=s["answer_prefix"], max_new_tokens=8)
    rows.append((s["depth"], s["answer"], r["answer"], is_correct(r["answer"], s["answer"]), r["prefill_s"]))
for depth, key, ans, ok, t in rows:
    print(f"depth {depth:4.2f}  key {key}  answer {ans!r:28}  {'ok' if ok else 'MISS'}  prefill {t:.2f}s")
print(f"accuracy: {sum(r[3] for r in rows)}/{len(rows)}")

# %% [markdown]
# **Reading it:** the full cache answers (nearly) every needle at every depth; any drop in the other
# notebooks is the price of compression, not of the task. Times are CPU times on the machine that built
# this page.

# %% [markdown]
# ## The ceiling on the evidence prompts
# The same task on the prompts of the evidence runs (`scripts/evidence.py --methods full`, ~1.5k-token passkey
# prompts, needle depths 0-100%, both settings). Each method's notebook draws these accuracies as dashed lines.

# %%
from reference_impls.report import show_evidence

show_evidence("results/eviction/full.json", "Full cache on SmolLM2-135M", baseline=None)
