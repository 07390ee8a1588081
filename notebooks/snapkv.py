# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # SnapKV: the end of the prompt already knows what the answer will read
#
# **What you will learn:** SnapKV (Li et al., arXiv 2404.14469) observes that the attention of the last few
# prompt tokens (the *observation window*) to the earlier tokens picks out much the same tokens that the
# generated answer will later attend to. It therefore keeps, per head, the window plus the prefix tokens the
# window votes for. We check the implementation, measure that overlap on the embedded SmolLM2-135M, look at
# where a passkey's digits rank among the votes, and read the accuracy-vs-ratio sweep.
#
# Votes of the window $W$ (the last $w$ queries) for prefix key $j$, per query head, then pooled (Section 4):
#
# $$C_j = \sum_{i \in W} \mathrm{softmax}\!\left(\frac{q_i K^\top}{\sqrt d}\right)_j, \qquad
# \tilde C = \mathrm{pool}_{k}(C), \qquad \text{keep } \operatorname{top}_{b-w}(\tilde C) \cup W .$$
#
# With GQA the $G$ query heads of a KV head average their pooled votes (kvpress's choice; the official code
# instead stores one copy of the cache per query head).

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model
from reference_impls.data import passkey_samples
from reference_impls.eviction import SnapKV
from reference_impls.eviction.snapkv import snapkv_scores
from reference_impls.generation import eos_ids, build_prompt, greedy_generate
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()

# %% [markdown]
# ## A check: every head keeps its window plus (budget − window) voted tokens
# Budget 48 with a 16-token window on a 300-token prompt: each layer and KV head holds exactly 48 tokens,
# the last 16 always among them.

# %%
ids = torch.randint(100, 5000, (1, 300), generator=torch.Generator().manual_seed(0))
cache = KVCache(model, SnapKV(budget=48, window=16))
with torch.no_grad():
    model(ids, cache=cache)
for i in (0, 15, 29):
    kept = cache.layers[i].store.kept_slots()
    assert kept.shape == (1, 3, 48) and (kept[..., -16:] == torch.arange(284, 300)).all()
    print(f"layer {i:2d} head 0 keeps prefix positions {kept[0, 0, :32].tolist()[:12]} ...")

# %% [markdown]
# ## The paper's observation in miniature: the window predicts what the answer reads
# For three passkey prompts (~1k tokens, needle at depths 20/50/80%) we generate the answer with the full
# cache, then compare, per layer and KV head, the top 10% of context tokens selected by
#
# * the **question window**: the last 32 prompt tokens (question, chat template, answer prefix) — the
#   query-aware setting;
# * the **context window**: the last 32 tokens of the context alone — the query-agnostic setting;
# * the **generated answer**: the queries of the generated tokens (what decoding actually attends to).
#
# Overlap = |top-k(window) ∩ top-k(answer)| / k; a random choice would give 0.10.

# %%
samples = passkey_samples(3, 1000, seed=11, tokenizer=tok, depths=[0.2, 0.5, 0.8])
eos = eos_ids(model, tok)
W, FRAC = 32, 0.10
L = model.config.num_hidden_layers
overlap = {"question window": torch.zeros(L), "context window": torch.zeros(L)}
needle_pct = {"question window": torch.zeros(L), "context window": torch.zeros(L)}
for s in samples:
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    prompt = torch.cat([ctx, qst], 1)
    P, T = ctx.shape[1], prompt.shape[1]
    gen = greedy_generate(model, KVCache(model, Full()), [prompt], 8, eos)
    fed = [t for t in gen.tokens[:-1] if t not in eos]  # generated tokens that were fed back
    rec = record_prefill(model, torch.cat([prompt, torch.tensor([fed])], 1))
    key_ids = tok(s["answer"], add_special_tokens=False).input_ids
    flat = ctx[0].tolist()
    needle = [j + o for j in range(P - len(key_ids)) if flat[j:j + len(key_ids)] == key_ids for o in range(len(key_ids))]
    k_top = int(FRAC * P)
    for layer, (q, k) in enumerate(zip(rec.queries, rec.keys)):
        votes = {"question window": snapkv_scores(q[:, :, T - W:T], k[:, :, :T], rec.scaling)[0, :, :P],
                 "context window": snapkv_scores(q[:, :, P - W:P], k[:, :, :P], rec.scaling)[0, :, :P - W]}
        answer = snapkv_scores(q[:, :, T:], k, rec.scaling)[0, :, :P]
        top_ans = answer.topk(k_top, -1).indices
        for name, v in votes.items():
            top = v.topk(k_top, -1).indices
            hits = [len(set(a.tolist()) & set(b.tolist())) / k_top for a, b in zip(top, top_ans)]
            overlap[name][layer] += sum(hits) / len(hits) / len(samples)
            order = v.argsort(-1, descending=True).argsort(-1)  # rank of every token, 0 = best
            best = torch.stack([order[:, j] for j in needle if j < v.shape[-1]], -1).min(-1).values.float()
            needle_pct[name][layer] += (best / v.shape[-1]).median() / len(samples)
    print(f"depth {s['depth']:.1f}: answer {tok.decode(fed).strip()!r} (passkey {s['answer']}), "
          f"needle digits at context tokens {needle[:1]}..{needle[-1:]} of {P}")

fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
for name in overlap:
    ax[0].plot(overlap[name], "o-", label=name)
    ax[1].semilogy(needle_pct[name].clamp(min=1e-4), "o-", label=name)
ax[0].axhline(FRAC, color="gray", ls=":", label="random")
ax[0].set_xlabel("layer"); ax[0].set_ylabel("overlap with the answer's top 10%"); ax[0].legend()
ax[0].set_title("window vs generated answer: same tokens?")
for r in (2, 4, 8):
    ax[1].axhline(1 / r, color="gray", ls=":")
    ax[1].text(L - 1, 1 / r, f" kept at x{r}", va="bottom", ha="right", color="gray")
ax[1].set_xlabel("layer"); ax[1].set_ylabel("needle's best rank / context length (median head)")
ax[1].set_title("where the passkey's digits rank among the votes"); ax[1].legend()
plt.tight_layout(); plt.show()
print(f"{'':16} {'mean overlap':>12} {'layers where needle in top 12.5%':>34}")
for name in overlap:
    print(f"{name:16} {overlap[name].mean():12.2f} {int((needle_pct[name] < 0.125).sum()):>28d} / {L}")

# %% [markdown]
# ## Why the window size matters on short prompts
# The default window (64, from the official code and kvpress, tuned on prompts of thousands of tokens) is
# longer than this prompt's question part (~40 tokens), so its first queries are context tokens whose
# attention is local. On two of the evidence prompts (~1.5k tokens, needle near the start) we count how many
# of the passkey's (layer, head, digit) entries survive x1.25 and what the model answers, for windows 8 and 64.

# %%
ev = passkey_samples(30, 1500, seed=0, tokenizer=tok)
print(f"{'prompt':>6} {'window':>6} {'digits kept':>12} {'answer':>10} {'passkey':>8}")
for idx in (1, 5):
    ctx, qst = build_prompt(tok, ev[idx]["context"], ev[idx]["question"], ev[idx]["answer_prefix"])
    prompt = torch.cat([ctx, qst], 1)
    rec = record_prefill(model, prompt)
    key_ids = tok(ev[idx]["answer"], add_special_tokens=False).input_ids
    flat = prompt[0].tolist()
    digits = [j + o for j in range(len(flat)) if flat[j:j + len(key_ids)] == key_ids for o in range(len(key_ids))]
    for w in (8, 64):
        c = cache_from_record(model, SnapKV(ratio=1.25, window=w), rec)
        kept = sum(int((layer.store.kept_slots()[0, h] == j).any()) for layer in c.layers for h in range(3) for j in digits)
        ans = tok.decode(greedy_generate(model, c, [], 8, eos, logits=rec.logits).tokens, skip_special_tokens=True)
        print(f"{idx:6d} {w:6d} {kept:5d} / {3 * L * len(digits):4d} {ans.strip():>10} {ev[idx]['answer']:>8}")

# %% [markdown]
# ## Accuracy against compression on the passkey task
# From the evidence run (`scripts/evidence.py --methods snapkv,pyramidkv`: 30 prompts of ~1.5k
# tokens, needle depths 0-100%, both settings, 8 new tokens); StreamingLLM beside it for reference. The ratio
# is measured from the bytes the cache holds (kept keys/values plus their int32 stream indices).

# %%
from reference_impls.report import show_evidence

show_evidence("results/eviction/snapkv.json", "SnapKV on SmolLM2-135M")
show_evidence("results/eviction/streamingllm.json", "StreamingLLM on SmolLM2-135M")

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (Mistral-7B, LWM-Text-Chat-1M, LongChat, Mixtral; 16k-380k tokens) | here (SmolLM2-135M, ~1-1.5k tokens, CPU) |
# |---|---|---|
# | observation | the window's attention pattern is consistent with what generation attends to (Section 3) | mean overlap with the answer's top 10%: 0.57 for the question window, 0.41 for the context-only window, 0.10 by chance (3 prompts; printed above) |
# | needle | Needle-in-a-Haystack with a negligible accuracy drop up to 380k tokens on one A100-80GB (abstract, LWM-Text-Chat-1M) | the passkey digits reach the top 12.5% of votes (median head) in 5 of 30 layers for the question window, in none for the context-only window: this 135M model's window attention is diffuse |
# | window | official default 64 for prompts of thousands of tokens (config default 32) | on ~1.5k-token prompts a 64-token window reaches into the context; with window 8 the passkey survives x1.25 on prompt 1 (window 64 answers 4672 for 46711), and more needle entries are kept on both prompts (table above) |
# | compression | comparable to the full cache on 16 LongBench datasets; 3.6x faster generation and 8.2x better memory efficiency at 16k tokens (abstract) | accuracy-vs-ratio table above (30 prompts): compare the query-aware and query-agnostic rows; speed is not comparable on this CPU |
