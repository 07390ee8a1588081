# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Quest: bound what a query can score on a page of keys, then read only the best pages
#
# **What you will learn:** Quest (Tang et al., arXiv 2406.10774) keeps the whole KV cache, cut into pages of $S$
# tokens, and stores two extra vectors per page: the element-wise minimum $m$ and maximum $M$ of its keys. At
# each decoding step the current query bounds the largest logit any key of a page can reach, and attention
# reads only the $K$ pages with the highest bounds (the current page always). Memory is not saved; the bytes
# read per step are. We check the bound on the embedded SmolLM2-135M, measure how many of the query's true
# top-10 keys the chosen pages contain as the page size grows, and compare the bytes read with the paper's formula.
#
# $$U_p = \sum_{d=1}^{D} \max\big(q_d\, m_{p,d},\; q_d\, M_{p,d}\big) \;\ge\; \max_{k \in p}\, q\cdot k, \qquad
# \text{read } \operatorname{TopK}_p(U_p), \qquad \frac{\text{bytes read}}{\text{bytes held}} \approx
# \frac{1}{S} + \frac{K}{L}\ \ (\text{Section 3.5}).$$
#
# With GQA (SmolLM2: 9 query heads, 3 KV heads) the pages are chosen per KV head by the max of its query
# heads' bounds, which is still an upper bound of every logit on the page.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, load_model
from reference_impls.base import Model, Step
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.retrieval import Quest
from reference_impls.retrieval.quest import quest_page_scores

model, tok = load_model()
L, S0 = model.config.num_hidden_layers, 16

# %% [markdown]
# ## A check: the bound holds on the model's own keys
# Three passkey prompts (~800 tokens, needle at depths 20/50/80%) are recorded once with the full cache. Quest's
# stores are built from the recording (the same appends a live prefill makes); for the last prompt query of
# layer 12, every page's bound is at least the largest (unscaled) logit of its keys; how loose it is decides
# how well the pages are ranked.

# %%
samples = passkey_samples(3, 800, seed=3, tokenizer=tok, depths=[0.2, 0.5, 0.8])
records = []
for s in samples:
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    records.append(record_prefill(model, torch.cat([ctx, qst], 1)))

rec = records[0]
cache = cache_from_record(model, Quest(budget=64), rec, tok)
store, layer = cache.layers[12].store, 12
q, k = rec.queries[layer][:, :, -1], rec.keys[layer]  # (1, H, D), (1, H_kv, T, D)
U = quest_page_scores(q, store.kmin, store.kmax)[0]  # (H_kv, pages)
T = k.shape[2]
logits = torch.einsum("gjd,gtd->gjt", q[0].view(3, 3, -1), k[0])  # (H_kv, G, T): unscaled, as U is
true_max = torch.stack([logits[:, :, p * S0:(p + 1) * S0].amax(dim=(1, 2)) for p in range(U.shape[1])], 1)
assert (U >= true_max - 1e-4).all()
slack = U - true_max
print(f"{T} tokens, {U.shape[1]} pages of {S0}: every page bounded: {bool((slack >= -1e-4).all())}; bound - true max "
      f"per page: median {float(slack.median()):.1f}, against a spread of logits (std) of {float(logits.std()):.1f}")

# %% [markdown]
# ## The paper's observation in miniature: the pages keep the keys the query needs
# Quest's Figure 4 measures the *recall* of the 10 keys with the highest attention: the share of them that the
# selected tokens contain. We feed each recorded prompt to a Quest store per layer (layers 2-29; the first two
# are dense, as in the paper): the prompt minus its last 12 tokens as a prefill, then those 12 tokens (the end
# of the question and the answer prefix "The secret passkey is", where the model must find the passkey) one at a
# time as decoding steps. For each we count how many of the query's true top-10 keys (full attention, summed
# over the KV group) the chosen pages hold, for page sizes 4 ... 64 at token budgets 64 and 128. A window of the
# most recent tokens with the same budget (what StreamingLLM-style eviction keeps) is the query-agnostic baseline.

# %%
page_sizes, budgets, last = [4, 8, 16, 32, 64], [64, 128], 12


def attention(q, k, t, scaling):
    """Query t's full attention over keys 0..t, summed over each KV group's 3 query heads: (H_kv, t + 1)."""
    return torch.softmax(torch.einsum("gjd,gtd->gjt", q[0, :, t].view(3, 3, -1), k[0, :, : t + 1]) * scaling, -1).sum(1)


@torch.no_grad()
def recall(method, rec, layers=range(2, L)):
    """Mean share of each query's top-10 keys that `method`'s store lets it read, over the last queries."""
    hits = []
    for layer in layers:
        q, k, v = rec.queries[layer], rec.keys[layer], rec.values[layer]
        T = k.shape[2]
        store = method.new_layer(layer, Model(num_layers=L))
        store.append(k[:, :, : T - last], v[:, :, : T - last])
        store.select(Step.dense(q[:, :, : T - last], store.k, store.v))  # the prompt: bounds only
        for t in range(T - last, T):
            store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            sel = store.select(Step.dense(q[:, :, t:t + 1], store.k, store.v, compress=False, start=0))
            att = attention(q, k, t, rec.scaling)
            top = att.topk(10, dim=-1).indices  # (H_kv, 10)
            read = torch.ones_like(att, dtype=torch.bool) if sel is None else sel[0, :, 0]
            hits.append(torch.gather(read, 1, top).float().mean())
    return float(torch.stack(hits).mean())


def window_recall(rec, budget, layers=range(2, L)):
    hits = []
    for layer in layers:
        q, k = rec.queries[layer], rec.keys[layer]
        T = k.shape[2]
        for t in range(T - last, T):
            att = attention(q, k, t, rec.scaling)
            hits.append((att.topk(10, dim=-1).indices > t - budget).float().mean())
    return float(torch.stack(hits).mean())


table = {b: [sum(recall(Quest(budget=b, page_size=S), r) for r in records) / len(records) for S in page_sizes]
         for b in budgets}
window = {b: sum(window_recall(r, b) for r in records) / len(records) for b in budgets}

fig, ax = plt.subplots(figsize=(6.5, 3.8))
for b, c in zip(budgets, ("C0", "C1")):
    ax.plot(page_sizes, table[b], "o-", color=c, label=f"Quest, budget {b} tokens")
    ax.axhline(window[b], color=c, ls=":", label=f"recent window of {b} tokens")
ax.set_xscale("log", base=2); ax.set_xticks(page_sizes, [str(s) for s in page_sizes])
ax.set_xlabel("page size S (tokens)"); ax.set_ylabel("recall of the query's top-10 keys")
ax.set_ylim(0, 1.02); ax.legend(fontsize=8); ax.set_title("SmolLM2-135M, ~800-token passkey prompts, layers 2-29")
plt.tight_layout(); plt.show()
print(f"{'page size':>10} " + " ".join(f"{s:>6d}" for s in page_sizes) + f" {'window':>7}")
for b in budgets:
    print(f"budget {b:>3} " + " ".join(f"{x:6.2f}" for x in table[b]) + f" {window[b]:7.2f}")

# %% [markdown]
# ## Bytes read against the paper's formula, and the passkey answers
# Decoding the answer from each recorded prompt (prefilled in full, then greedy decoding) with 16-token pages:
# the bytes attention read per decoded token over the keys and values held, beside the paper's estimate
# $1/S + K/L$ for the 28 sparse layers (the two dense layers read everything).

# %%
eos = eos_ids(model, tok)
keys = ", ".join(s["answer"] for s in samples)
print(f"{'budget':>6} {'read / K,V held':>16} {'paper 1/S + K/L':>16}  answers (passkeys {keys})")
for budget in (32, 64, None):
    answers, ratio, formula = [], [], []
    for rec in records:
        cache = cache_from_record(model, Full() if budget is None else Quest(budget=budget), rec, tok)
        gen = greedy_generate(model, cache, [], 7, eos, logits=rec.logits)
        answers.append(tok.decode([t for t in gen.tokens if t not in eos]).strip())
        if budget is not None:
            held = sum(layer.store.k.nbytes + layer.store.v.nbytes for layer in cache.layers)
            n = cache.layers[0].store.k.shape[2]
            ratio.append(gen.read_kv_bytes / held)
            formula.append((2 + (L - 2) * (1 / S0 + budget / n)) / L)
    shown = "full" if budget is None else str(budget)
    nums = f"{sum(ratio) / len(ratio):16.3f} {sum(formula) / len(formula):16.3f}" if ratio else f"{1:16.3f} {1:16.3f}"
    print(f"{shown:>6} {nums}  {answers}")

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (LongChat-7B-v1.5-32k, Yarn-Llama-2-7B-128k; 10k-100k tokens) | here (SmolLM2-135M, ~800 tokens, CPU) |
# |---|---|---|
# | bound | $U_p$ bounds every $q\cdot k$ on the page (Section 3.4) | holds on every page of layer 12; its slack (printed above) is several times the spread of the logits, so page ranking is coarse and smaller pages rank better |
# | recall | Figure 4: Quest's top-10 recall stays close to full attention at budgets 64-1024 with 16-token pages, H2O's collapses (bar chart; we do not read values off it) | recall vs page size printed above: smaller pages track the top keys better, and any page size beats a recent window of the same budget |
# | bytes | reads $1/S + K/L$ of the cache: 1/8 for S = 16, K = 4K tokens, L = 64K (Section 3.5) | measured bytes read over K,V held beside the formula, printed above (the two dense layers read everything; the current page is partial, so a little under the formula) |
# | passkey | Table 1: 99% at a 64-token budget on 10k-token prompts (LongChat), 96-100% at 1-2K budgets on 100k (Yarn-Llama-2) | answers at budgets 32 and 64 printed above (3 prompts, the prompt itself prefilled in full: a smoke test, not an accuracy) |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.
# It holds the whole cache (achieved ratio about 1) and reads part of it per decoded token: the read ratio
# (full 16-bit bytes over bytes read) is the one that meets the target, and the plot is against it.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("quest")
