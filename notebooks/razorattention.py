# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # RazorAttention: a few heads retrieve, the others only need what is near
#
# **What you will learn:** RazorAttention (Tang et al., arXiv 2407.15891) observes that only a few attention heads
# look across the whole context: *echo heads*, which attend to the earlier occurrence of the current token, and
# *induction heads*, which attend to the token that followed it. Those keep their whole cache; every other head
# keeps a few sink tokens, a recent buffer, and one *compensation token* standing for everything it dropped. We
# find the echo and induction heads of the embedded SmolLM2-135M, check the compensation token, see how far the
# ratio can go, and run a few passkey prompts against StreamingLLM at the same ratio.
#
# On a random sequence repeated twice (period $P$), head $h$'s scores average its attention over the second copy's
# queries $i$:
#
# $$\mathrm{echo}_h = \overline{a^h_{i,\,i-P}}, \qquad \mathrm{induction}_h = \overline{a^h_{i,\,i-P+1}} .$$
#
# The top 14% of heads by induction score and the top 1% by echo score keep their cache (Section 3). A
# non-retrieval head keeps $N_0$ sinks and the last $L_h = \max(S_0, N / C)$ tokens (Algorithm 1); the $n_d$
# tokens it drops, $D$, become one token (Eq. 4) that attention weighs as $n_d$ copies (Eq. 5):
#
# $$\hat k = \tfrac{1}{n_d}\textstyle\sum_{m \in D} k_m, \quad \hat v = \tfrac{1}{n_d}\sum_{m \in D} v_m, \qquad
# \mathrm{Attn}(q) = \frac{\sum_{i} e^{q k_i^\top} v_i + n_d\, e^{q \hat k^\top} \hat v}
# {\sum_{i} e^{q k_i^\top} + n_d\, e^{q \hat k^\top}} .$$
#
# Here the weight $n_d$ is a logit bias of $\log n_d$ on the compensation key (`LayerStore.logit_bias`).

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls import Full, KVCache, StreamingLLM, load_model
from reference_impls.data import passkey_samples
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.heads import RazorAttention
from reference_impls.heads.razorattention import echo_induction_scores
from reference_impls.integration import model_info
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()
info = model_info(model, tok)
L, H, H_kv = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads

# %% [markdown]
# ## Which heads copy: echo and induction scores
# The calibration text "repeat" is 512 random tokens, then the same 512 again (one prefill, cached on disk). Each
# query head's scores, then the KV heads RazorAttention keeps whole: a KV head is a retrieval head when one of its
# query heads is (its score is the max over its group), and the top fractions are taken over all 90 KV heads.

# %%
steps = info.calibration("repeat", 1024)
period = steps[0].keys.shape[2] // 2
echo, induction = torch.zeros(L, H), torch.zeros(L, H)
for layer, s in enumerate(steps):
    e, i = echo_induction_scores(s.last(period).probs(), period)
    echo[layer], induction[layer] = e[0], i[0]
method = RazorAttention(ratio=4)
retrieval = method.retrieval(info)  # (L, H_kv) bool

fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 3, 1.3]})
for a, x, name in ((ax[0], echo, "echo score"), (ax[1], induction, "induction score")):
    im = a.imshow(x.T, aspect="auto", cmap="viridis")
    a.set_xlabel("layer"); a.set_ylabel("query head"); a.set_title(name); fig.colorbar(im, ax=a)
ax[2].imshow(retrieval.T.float(), aspect="auto", cmap="Greys")
ax[2].set_xlabel("layer"); ax[2].set_ylabel("KV head"); ax[2].set_title("kept whole")
plt.tight_layout(); plt.show()
heads = [(l, h) for l in range(L) for h in range(H_kv) if retrieval[l, h]]
print(f"retrieval KV heads (layer, head): {heads}")
print(f"{len(heads)} of {L * H_kv} KV heads ({len(heads) / (L * H_kv):.1%}); strongest echo head "
      f"{echo.max():.2f} (layer {int(echo.argmax()) // H}), strongest induction head {induction.max():.2f} "
      f"(layer {int(induction.argmax()) // H}); median head: echo {echo.median():.3f}, "
      f"induction {induction.median():.3f}")

# %% [markdown]
# ## A check: what a non-retrieval head holds, and the compensation token as n_d copies
# A 300-token prompt at 4x: retrieval heads hold all 300 tokens, the others 4 sinks and a buffer of $L_h$ tokens
# (chosen so the cache holds a quarter of the tokens), plus the compensation token. Then one decoding step: the
# attention weights the model used (with the $\log n_d$ bias) equal plain softmax attention where $\hat k$ is
# repeated $n_d$ times (the copies' weights summed).

# %%
ids = torch.randint(100, 5000, (1, 300), generator=torch.Generator().manual_seed(0))
cache = KVCache(model, RazorAttention(ratio=4), tok)
with torch.no_grad():
    model(ids, cache=cache)
layer = next(l for l in range(L) if retrieval[l].any())
store = cache.layers[layer].store
print(f"layer {layer}: tokens held per KV head {(store.kept_slots()[0] >= 0).sum(-1).tolist()}, "
      f"retrieval heads {retrieval[layer].tolist()}, compensation token stands for "
      f"{torch.where(retrieval[layer], 0, store.comp[2][0].exp().round().int()).tolist()} tokens")
seen = {}
orig = store.after_attention
store.after_attention = lambda step: (seen.setdefault("step", step), orig(step))
with torch.no_grad():
    model(torch.tensor([[42]]), cache=cache)
step = seen["step"]
h = int((~retrieval[layer]).nonzero()[0])  # a non-retrieval KV head
n_d = int(store.comp[2][0, h].exp().round())
held = step.positions[0, h] >= 0
keys = torch.cat([step.keys[0, h, :1].expand(n_d, -1), step.keys[0, h, 1:][held[1:]]])  # k_hat n_d times, then kept
q = step.queries[0, h * (H // H_kv), 0]
plain = torch.softmax(keys.float() @ q.float() * step.scaling, 0)
plain = torch.cat([plain[:n_d].sum(0, keepdim=True), plain[n_d:]])
used = step.probs()[0, h * (H // H_kv), 0][held]
print(f"KV head {h}: max |weight difference| {(plain - used).abs().max():.1e}; the compensation token drew "
      f"{used[0]:.3f} of the attention")

# %% [markdown]
# ## How far the ratio goes
# The retrieval heads alone hold their share of the cache, so no setting can compress beyond about
# 1 / share; below $S_0$ the buffer cannot shrink. Three passkey prompts (~800 tokens, needle at depths 15, 50
# and 85%) are prefilled once and replayed for every setting; the ratio is measured from the bytes held
# (kept keys and values, their int32 indices, the compensation tokens and their counts) against a full cache of
# the same dtype.

# %%
eos = eos_ids(model, tok)
samples = passkey_samples(3, 800, seed=3, tokenizer=tok, depths=[0.15, 0.5, 0.85])
records = [record_prefill(model, torch.cat(build_prompt(tok, s["context"], s["question"], s["answer_prefix"]), 1))
           for s in samples]


def run(m):
    """Mean achieved ratio, passkeys found, answers over the three prompts."""
    ratios, answers, right = [], [], 0
    for s, r in zip(samples, records):
        c = cache_from_record(model, m, r, tok)
        ratios.append(c.full_nbytes() / c.nbytes())  # against a full cache of the model's dtype
        ans = tok.decode(greedy_generate(model, c, [], 6, eos, logits=r.logits).tokens, skip_special_tokens=True)
        answers.append(ans.strip())
        right += s["answer"] in ans
    return sum(ratios) / len(ratios), right, answers


share = float(retrieval.float().mean())
print(f"retrieval heads hold {share:.1%} of a full cache: at most {1 / share:.1f}x before sinks and buffer")
reach = {target: run(RazorAttention(ratio=target))[0] for target in (2, 4, 6, 8)}
print("target -> achieved:", {t: round(a, 2) for t, a in reach.items()})
print(f"at the 4x target the cache is {1 - 1 / reach[4]:.0%} smaller than a full cache")

# %% [markdown]
# ## Passkeys at the same ratio as StreamingLLM
# At 4x, StreamingLLM keeps 4 sinks and the most recent tokens in every head; RazorAttention keeps 14 heads whole
# and the recent tokens elsewhere. The paper's ablation removes the compensation token (`compensate=False`).

# %%
configs = {"full": Full(), "StreamingLLM 4x": StreamingLLM(ratio=4), "RazorAttention 4x": RazorAttention(ratio=4),
           "RazorAttention 4x, no compensation": RazorAttention(ratio=4, compensate=False)}
print(f"{'method':36} {'ratio':>6} {'passkeys':>9}   answers")
for name, m in configs.items():
    ratio, right, answers = run(m)
    print(f"{name:36} {ratio:6.2f} {right:5d} / 3   {answers}")
print("passkeys:", [s["answer"] for s in samples])

# %% [markdown]
# ## What the paper reported, and what we see
# | | paper (Qwen, Llama-2, Llama-3, Baichuan; LongBench, Needle in a Haystack) | here (SmolLM2-135M, ~800-token passkeys, CPU) |
# |---|---|---|
# | retrieval heads | 15% of heads (14% induction + 1% echo) keep their cache (Section 3; the Huawei toolkit's defaults) | the same fractions of the 90 KV heads, listed above: all in layers 14-24, where a few heads reach echo or induction scores far above the median head (printed above) |
# | compression | over 70% smaller KV cache "without noticeable impact" (abstract) | 4x = 75% smaller; the ratio saturates where the retrieval heads' share allows (printed above: the 8x target is not met) |
# | passkey | retrieval preserved on Needle in a Haystack | passkeys found at 4x beside StreamingLLM at the same measured ratio and without the compensation token (table above; three prompts only) |
#
# The scores come from one 1024-token calibration text (the paper and the toolkit use 2500 random tokens repeated
# four times); $N_0 = 4$ and $S_0 = 16$ are ours for short prompts, and the ratio picks $C$ (see the module's
# Deviations).

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("razorattention")
