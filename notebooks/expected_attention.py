# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Expected Attention: score the keys by the attention that queries still to come should pay them
#
# **What you will learn:** Expected Attention (Devoto, Jeblick, Jégou, arXiv 2510.00636; NVIDIA kvpress's
# `ExpectedAttentionPress`) does not look at attention already paid. It models the queries of the *next*
# tokens as a Gaussian (mean and covariance of the prompt's pre-RoPE queries, rotated by the RoPE matrix averaged
# over the next positions) and computes, in closed form, the attention they are expected to give each key. We
# check the implementation, measure on the embedded SmolLM2-135M how well that prediction matches the attention
# the continuation of a text really pays, and how the continuation's perplexity fares after compression.
#
# With $q \sim \mathcal N(\bar R\mu, \bar R\Sigma\bar R^\top)$, $\bar R = \frac1F\sum_{j=1}^{F} R_{n+j}$ and
# $s = 1/\sqrt d$, the Gaussian's moment generating function gives
#
# $$\mathbb E\big[e^{s\,q\cdot k_i}\big] = \exp\!\Big(s\,(\bar R\mu)\cdot k_i + \tfrac{s^2}{2}\,k_i^\top \bar R\Sigma\bar R^\top k_i\Big),
# \qquad \hat a_i = \frac{\mathbb E[e^{s q\cdot k_i}]}{\sum_j \mathbb E[e^{s q\cdot k_j}]},\qquad
# \text{score}_i = (\hat a_i + \epsilon)\,\lVert v_i\rVert_2 ,$$
#
# averaged over the query heads of each KV head; the first `n_sink` tokens are always kept.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, load_model
from reference_impls.base import Step, attention_probs
from reference_impls.data import passkey_samples
from reference_impls.eviction import KNorm, SnapKV, StreamingLLM
from reference_impls.eviction.expected_attention import ExpectedAttention
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()
info = KVCache(model, Full()).model_info  # what a method is told about the model: its RoPE, among others

# %% [markdown]
# ## A check: every head keeps the 4 sinks plus the best expected-attention scores
# On a 200-token prompt with a budget of 30, the kept set of each KV head equals the 4 sinks plus the top 26
# scores that the method's own `score` gives on the recorded prefill.

# %%
ids = torch.randint(100, 5000, (1, 200), generator=torch.Generator().manual_seed(0))
rec = record_prefill(model, ids)
cache = KVCache(model, ExpectedAttention(budget=30))
with torch.no_grad():
    model(ids, cache=cache)
for layer in (3, 17):
    scorer = ExpectedAttention(budget=30).new_layer(layer, info).method  # bound to the model's RoPE
    step = Step.dense(rec.queries[layer], rec.keys[layer], rec.values[layer], scaling=rec.scaling, layer_idx=layer)
    s = scorer.score(step, None, None)[0]  # (H_kv, T)
    expect = torch.cat([torch.arange(4).expand(s.shape[0], 4), s[:, 4:].topk(26).indices.sort().values + 4], 1)
    assert torch.equal(cache.layers[layer].store.kept_slots()[0], expect)
print("kept == 4 sinks + the 26 best expected-attention scores, every head of layers 3 and 17")

# %% [markdown]
# ## The paper's observation in miniature: the predicted attention matches what the continuation attends to
# Two passkey haystacks of ~900 tokens: the first $P = 700$ tokens are the "prompt", the next $C = 200$ tokens
# its continuation, read with the full cache. Per layer and KV head we compare, over the prompt's keys (sinks
# left out), the attention the $C$ continuation queries actually pay (mean over them and over the group) with
# three predictors computed from the prompt alone:
#
# * **expected attention** (`ExpectedAttention(use_vnorm=False)` with `n_future_positions = C`);
# * **window attention**: what the last 64 prompt queries paid (SnapKV's vote, the past standing in for the future);
# * **key norm**: $-\lVert k\rVert$ (KNorm).
#
# Two measures: the Spearman rank correlation with the observed attention, and the share of the observed
# attention mass that lands on each predictor's top 25% (what eviction at 4x would keep, sinks aside).

# %%
P, C, W, S = 700, 200, 64, 4
L = model.config.num_hidden_layers


def ranks(x):
    return x.argsort(-1).argsort(-1).float()


def spearman(a, b):
    ra, rb = ranks(a) - (a.shape[-1] - 1) / 2, ranks(b) - (b.shape[-1] - 1) / 2
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def mass_on_top(pred, obs, frac=0.25):
    top = pred.topk(int(frac * pred.shape[-1]), -1).indices
    return obs.gather(-1, top).sum(-1) / obs.sum(-1)


names = ["expected attention", "window attention", "key norm"]
corr, mass = {n: torch.zeros(L) for n in names}, {n: torch.zeros(L) for n in names}
texts = passkey_samples(2, P + C + 150, seed=21, tokenizer=tok)
recs = []
for t in texts:
    x = tok(t["context"], return_tensors="pt").input_ids[:, :P + C]
    rec = record_prefill(model, x)
    recs.append(rec)
    T = x.shape[1]
    assert T == P + C, T
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(L):
        q, k, v = rec.queries[layer], rec.keys[layer], rec.values[layer]
        H_kv, H = k.shape[1], q.shape[1]
        probs = attention_probs(q[:, :, P:], k, causal[P:].expand(1, H_kv, C, T), rec.scaling)[0]  # (H, C, T)
        obs = probs[:, :, S:P].mean(1).view(H_kv, -1, P - S).mean(1)  # (H_kv, P - S) attention really paid
        scorer = ExpectedAttention(n_future_positions=C, use_vnorm=False).new_layer(layer, info).method
        ea = scorer.score(Step.dense(q[:, :, :P], k[:, :, :P], v[:, :, :P], scaling=rec.scaling), None, None)
        win = attention_probs(q[:, :, P - W:P], k[:, :, :P], causal[P - W:P, :P].expand(1, H_kv, W, P), rec.scaling)[0]
        preds = {"expected attention": ea[0, :, S:], "window attention": win.mean(1).view(H_kv, -1, P).mean(1)[:, S:],
                 "key norm": -k[0, :, S:P].norm(dim=-1)}
        for n, p in preds.items():
            corr[n][layer] += spearman(p, obs).mean() / len(texts)
            mass[n][layer] += mass_on_top(p, obs).mean() / len(texts)

fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
for n in names:
    ax[0].plot(corr[n], "o-", ms=3, label=n)
    ax[1].plot(mass[n], "o-", ms=3, label=n)
ax[0].axhline(0, color="gray", lw=0.5); ax[1].axhline(0.25, color="gray", ls=":", label="random top 25%")
ax[0].set_xlabel("layer"); ax[0].set_ylabel("Spearman with the continuation's attention"); ax[0].legend()
ax[1].set_xlabel("layer"); ax[1].set_ylabel("share of its attention on the top 25%"); ax[1].legend()
ax[0].set_title("rank agreement, prompt keys (sinks aside)"); ax[1].set_title("attention mass a 4x cut would keep")
plt.tight_layout(); plt.show()
print(f"{'predictor':20} {'mean Spearman':>13} {'mean mass on top 25%':>21}")
for n in names:
    print(f"{n:20} {corr[n].mean():13.2f} {mass[n].mean():21.2f}")

# %% [markdown]
# ## Does the prediction help the continuation? Perplexity after compressing the prompt
# The same two texts: the 700-token prompt is compressed by each method (its prefill replayed from the recording
# above: the prompt's states are the first 700 of the full pass's, causality makes them identical), then the next
# 100 tokens are read through the compressed cache. Perplexity of those tokens (the first one excepted) against
# the full cache's; SnapKV's window here is the end of the prompt (no question: the query-agnostic setting).

# %%
import torch.nn.functional as F

from reference_impls.replay import PrefillRecord

methods = {"full": lambda r: Full(), "expected attention": lambda r: ExpectedAttention(ratio=r),
           "snapkv": lambda r: SnapKV(ratio=r), "knorm": lambda r: KNorm(ratio=r),
           "streamingllm": lambda r: StreamingLLM(ratio=r)}
N = 100
nll = {(m, r): 0.0 for m in methods for r in (2, 4) if m != "full" or r == 2}
for t, rec in zip(texts, recs):
    x = tok(t["context"], return_tensors="pt").input_ids[:, :P + N]
    prompt = PrefillRecord([q[:, :, :P] for q in rec.queries], [k[:, :, :P] for k in rec.keys],
                           [v[:, :, :P] for v in rec.values], rec.scaling, rec.logits, 0.0, input_ids=x[:, :P])
    for (m, r) in nll:
        c = cache_from_record(model, methods[m](r), prompt)
        with torch.no_grad():
            logits = model(x[:, P:], cache=c).logits[0, :-1]
        nll[m, r] += F.cross_entropy(logits.float(), x[0, P + 1:]).item() / len(texts)
print(f"{'method':20} {'ppl 2x':>7} {'ppl 4x':>7}")
for m in methods:
    row = [f"{torch.tensor(nll[m, r]).exp():7.2f}" if (m, r) in nll else f"{'':>7}" for r in (2, 4)]
    print(f"{m:20} {' '.join(row)}")


# %% [markdown]
# ## What the paper reported, and what we see
# | | paper | here (SmolLM2-135M, ~1k tokens, CPU) |
# |---|---|---|
# | observation | LLM activations are close to Gaussian, so the attention of future queries can be estimated in closed form from their statistics (abstract; method section) | made from the prompt alone, the prediction ranks the prompt's keys as the next 200 tokens' attention does: mean Spearman 0.92 (window attention 0.80, key norm 0.26); its top 25% holds 76% of that attention (0.73, 0.50; random 0.25); two texts, printed above |
# | prefill | consistently outperforms state-of-the-art baselines (compared with SnapKV, TOVA, KeyDiff, KNorm, StreamingLLM, among others) at prefill and during decoding (abstract) | perplexity of the next 100 tokens after compressing a 700-token prompt (two texts): full 53.4; expected attention 54.7 at 2x and 56.3 at 4x, SnapKV 55.4 / 56.8, KNorm 54.7 / 58.1, StreamingLLM 56.0 / 56.3: small differences on two texts of filler sentences, not a benchmark |
# | decoding | MATH-500 with the cache compressed while reasoning: 0.53 vs 0.57 full at 4x, 0.49 at 12x (DeepSeek-R1-Distill-Qwen-7B, Table 2) | not run: this implementation compresses the prefill only (Deviations (1)) |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("expected-attention")
