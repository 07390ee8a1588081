# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # InfLLM: a sliding window plus a memory of blocks, looked up by their most attended keys
#
# **What you will learn:** InfLLM (Xiao et al., arXiv 2402.04617) lets a model read a long stream through a
# small context window: the first tokens (attention sinks), a local window of the latest tokens, and a few
# *memory blocks* of older tokens brought back because they look relevant. Each block of $l$ tokens is
# represented by its $r$ keys that received the most attention while they were in the local window; a block's
# relevance to the current query is its summed dot product with those keys, and the top blocks join the window.
# We check what a decoding step reads, then test the paper's point in miniature on the embedded SmolLM2-135M: a
# passkey planted far outside the window is found through the memory, where a plain window of the same size
# cannot see it.
#
# $$\mathrm{rep}(b) = \operatorname{TopR}_{j \in b}\Big(\sum_{i:\,0 \le i - j < n_\text{local}} a_{ij}\Big),
# \qquad r(b) = \sum_{j \in \mathrm{rep}(b)} q \cdot k_j, \qquad
# \text{read} = \text{sinks} \cup \operatorname{TopK}_b\, r(b) \cup \text{local window}.$$
#
# As in the official code, a block's vector is the mean of its representative keys per query head, and blocks
# are ranked by the sum over all heads of the layer (one block set per layer).

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, load_model
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.retrieval import InfLLM

model, tok = load_model()
eos = eos_ids(model, tok)
L = model.config.num_hidden_layers

# %% [markdown]
# ## A check: what one decoding step reads
# A ~700-token passkey context is recorded once. With a read ratio of 4 and 16-token blocks, the seed's split
# (arXiv 2407.01527) gives 2.1% of the read budget to sinks, 32.4% to retrieved blocks (whole blocks) and the
# rest to the local window. The tokens a decoding step reads per KV head: sinks + retrieved blocks + the tail not
# yet in a block + the local window.

# %%
samples = passkey_samples(3, 700, seed=5, tokenizer=tok, depths=[0.1, 0.4, 0.7])
prompts = []
for s in samples:
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    prompts.append((record_prefill(model, ctx), qst, s["answer"]))

method = InfLLM(ratio=4, block_size=16)
rec, qst, _ = prompts[0]
n = rec.keys[0].shape[2]
n_init, n_local, topk = (int(t) for t in method.sizes(torch.tensor([n])))
cache = cache_from_record(model, method, rec, tok)
log = []
orig = cache.layers[10].store.select
cache.layers[10].store.select = lambda step: log.append(orig(step)) or log[-1]
greedy_generate(model, cache, [qst[:, :1]], 1)
store = cache.layers[10].store
print(f"context {n} tokens, read budget {round(n / 4)}: n_init {n_init}, n_local {n_local}, topk {topk} blocks "
      f"of 16; {int(store.n_blocks[0])} blocks in memory")
print(f"tokens read per KV head at the first decoding step: {log[-1][0, :, 0].sum(-1).tolist()} of {n + 1}")
big = InfLLM(ratio=4, block_size=128)  # the paper's block size, at the same read budget
print(f"with {big.block_size}-token blocks: topk {int(big.sizes(torch.tensor([n]))[2])} blocks")

# %% [markdown]
# ## The paper's observation in miniature: the memory finds what the window lost
# The context is prefilled (attended in full, our deviation), then the question arrives token by token and the
# answer is decoded: every one of those steps reads only sinks + window (+ blocks). The passkey sits at depths
# 10/40/70% of the context, all outside the local window. We compare, at the same read budget (ratio 4),
# InfLLM with 16-token blocks against a plain window (`retrieved_share=0`: sinks + local window only, what
# StreamingLLM attends to), and the full cache. For InfLLM we also count in how many layers the block holding
# the passkey's first digit is retrieved at the last question token.

# %%
def run(method, rec, qst, needle=None):
    cache = cache_from_record(model, method, rec, tok)
    found = []
    if needle is not None:  # which layers read the needle's block at the last question token
        for layer in cache.layers:
            orig = layer.store.select
            layer.store.select = lambda step, orig=orig: found.append(orig(step)) or found[-1]
    gen = greedy_generate(model, cache, [qst[:, i:i + 1] for i in range(qst.shape[1])], 7, eos)
    hit = None
    if needle is not None:
        at_last = found[(qst.shape[1] - 1) * L: qst.shape[1] * L]  # the select calls of the last question token
        hit = sum(bool(sel is None or sel[0, :, 0, needle].any()) for sel in at_last)
    return tok.decode([t for t in gen.tokens if t not in eos]).strip(), gen, hit


rows = []
for rec, qst, key in prompts:
    ids = rec.input_ids[0].tolist()
    first = tok(" " + key, add_special_tokens=False).input_ids[0]
    needle = max(i for i, t in enumerate(ids) if t == first)  # the passkey's first digit in the context
    for name, method in (("full", Full()), ("window", InfLLM(ratio=4, block_size=16, retrieved_share=0.0)),
                         ("InfLLM", InfLLM(ratio=4, block_size=16))):
        answer, gen, hit = run(method, rec, qst, needle if name == "InfLLM" else None)
        frac = gen.read_kv_bytes / gen.kv_bytes_end if gen.read_kv_bytes else 1.0
        rows.append((name, key, answer, frac, hit, needle / len(ids)))
        print(f"{name:>7} depth {needle / len(ids):.2f} passkey {key}: {answer!r:<24} read/held {frac:.2f}"
              + (f", needle's block read in {hit}/{L} layers" if hit is not None else ""))

fig, ax = plt.subplots(figsize=(6, 3.4))
names = ["full", "window", "InfLLM"]
acc = [sum(key in answer for n_, key, answer, *_ in rows if n_ == name) / len(prompts) for name in names]
read = [sum(f for n_, _, _, f, *_ in rows if n_ == name) / len(prompts) for name in names]
ax.bar(names, acc, color=["gray", "C1", "C0"])
for i, (a, r) in enumerate(zip(acc, read)):
    ax.text(i, a + 0.02, f"reads {r:.2f} of held", ha="center", fontsize=8)
ax.set_ylim(0, 1.15); ax.set_ylabel(f"passkeys found ({len(prompts)} prompts)")
ax.set_title("question streamed after a ~700-token context, read ratio 4"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (Mistral-7B, Llama-3-8B; InfiniteBench, LongBench; 100k-1M tokens) | here (SmolLM2-135M, ~700-token context, CPU) |
# |---|---|---|
# | memory vs window | InfLLM beats sliding-window baselines (StreamingLLM, LM-Infinite) on retrieval tasks where the window loses the fact (Table 1) | passkeys found with memory blocks vs a window of the same read budget, printed above |
# | lookup | representative tokens make block lookup work without training (Section 3.2) | layers whose lookup brings back the needle's block, printed above |
# | scale | Llama-3 with an 8K window: InfiniteBench average 45.0 vs 18.4 for the model truncated to 8K (Table 1); Retrieve.KV 55.8 vs 23.2 full attention on Llama-1M (Table 2) | 3 prompts, one read ratio: a smoke test of the mechanism, not an accuracy |
# | budget | 4K window + 16-32 blocks of 128 tokens; the seed splits a read budget 2.1% / 65.5% / 32.4% (sinks / window / blocks) | the seed's split at ratio 4, with 16-token blocks: the paper's 128-token blocks would leave no whole block (topk 0) in the ~172-token read budget printed above |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.
# It holds the whole cache (achieved ratio about 1) and reads part of it per decoded token: the read ratio
# (full 16-bit bytes over bytes read) is the one that meets the target, and the plot is against it.
# Below the default (128-token blocks, the paper's) comes `infllm:block_size=16`: smaller blocks, whose
# representative keys stand for fewer tokens.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("infllm")
_ = show_bench("infllm:block_size=16", title="infllm, 16-token blocks: passkey, 30 prompts (kvatlas bench)")
