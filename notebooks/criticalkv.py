# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # CriticalKV: keep what changes the output, not only what gets attention
#
# **What you will learn:** CriticalKV (Feng et al., arXiv 2502.03805; kvpress's `CriticalKVPress`) asks which
# cached entries matter for the *output* of attention after the output projection $W_o$. Evicting entry $i$
# perturbs head $h$'s projected output by an amount bounded by $A_i \lVert v_i W_o^h\rVert_1$: attention $A_i$
# alone ignores how large the entry's projected value is. Its selection therefore runs in two stages on top of a
# base method (SnapKV here): half of each head's budget goes to the best attention scores, the other half to the
# best $A_i \lVert v_i W_o^h\rVert_1$. We check the implementation, then measure on the embedded SmolLM2-135M
# what the paper measures: the output perturbation of each head, with and without the value-norm stage.
#
# With budget $b$ per head and $\alpha$ = `first_stage_ratio` (0.5):
#
# $$S_1 = \operatorname{top}_{\lfloor\alpha b\rfloor}(A), \qquad
# S_2 = \operatorname{top}_{b - |S_1|}\big\{(A_i + \epsilon)\,\lVert v_i W_o^h\rVert_1 : i \notin S_1\big\}, \qquad
# \text{keep } S_1 \cup S_2 .$$

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from reference_impls import Full, KVCache, load_model
from reference_impls.base import attention_probs
from reference_impls.data import passkey_samples
from reference_impls.eviction import CriticalKV, SnapKV
from reference_impls.generation import build_prompt, eos_ids, greedy_generate
from reference_impls.replay import cache_from_record, record_prefill

model, tok = load_model()
info = KVCache(model, Full()).model_info
assert info.weights is not None, "CriticalKV reads W_o from Model.weights, which this model does not expose"

# %% [markdown]
# ## A check: alpha = 1 is SnapKV; alpha = 0.5 keeps half of SnapKV's choice and the observation window
# 300 tokens, budget 60, SnapKV's window 16.

# %%
ids = torch.randint(100, 5000, (1, 300), generator=torch.Generator().manual_seed(0))
rec = record_prefill(model, ids)
kept = {name: cache_from_record(model, m, rec) for name, m in (
    ("snapkv", SnapKV(budget=60, window=16)),
    ("alpha=1", CriticalKV(budget=60, base=SnapKV(window=16), first_stage_ratio=1.0)),
    ("alpha=0.5", CriticalKV(budget=60, base=SnapKV(window=16))))}
for layer in range(model.config.num_hidden_layers):
    snap, one, half = (kept[n].layers[layer].store.kept_slots()[0] for n in kept)
    assert torch.equal(snap, one) and half.shape == snap.shape
    assert (half[:, -16:] == torch.arange(284, 300)).all()  # the window, whatever the value norms say
    for h in range(snap.shape[0]):
        assert len(set(snap[h].tolist()) & set(half[h].tolist())) >= 30  # stage 1: SnapKV's own top 30
changed = sum(len(set(a.tolist()) - set(b.tolist())) for layer in range(model.config.num_hidden_layers)
              for a, b in zip(kept["alpha=0.5"].layers[layer].store.kept_slots()[0],
                              kept["snapkv"].layers[layer].store.kept_slots()[0]))
print(f"alpha=1 == SnapKV in every head; alpha=0.5 keeps the window and >= 30 of SnapKV's 60; "
      f"{changed} (layer, head, token) entries swapped in by stage 2")

# %% [markdown]
# ## The paper's observation in miniature: output perturbation per head
# Two passkey prompts of ~800 tokens (question after the context, needle at depths 30% and 70%). For each layer
# and query head, the perturbation of its projected attention output over the prompt's keys,
# $\lVert (o - o') W_o^h \rVert_1$ with $o' $ the output over the kept keys (softmax renormalised), averaged over
#
# * the **window** queries: the last 64 prompt tokens, whose attention SnapKV's scores come from (in-sample);
# * the **answer** queries: the tokens the model generates with the full cache (out-of-sample).
#
# Both selections are the caches' own kept sets, SnapKV alone and CriticalKV over the same SnapKV, at 4x and 8x,
# for two SnapKV settings: kvpress's (window 64, average pooling over 5 tokens: the default here) and without
# pooling (kernel 1), where the base score A is exactly the window's attention that the paper's bound is about.

# %%
eos = eos_ids(model, tok)
samples = passkey_samples(2, 800, seed=7, tokenizer=tok, depths=[0.3, 0.7])
L, RATIOS, W = model.config.num_hidden_layers, (4, 8), 64
BASES = {"pooled": {}, "unpooled": {"kernel_size": 1}}  # SnapKV knobs: kvpress's defaults, then no pooling
pert = {(b, m, r, qs): [] for b in BASES for m in ("snapkv", "criticalkv") for r in RATIOS
        for qs in ("window", "answer")}
nll = {(b, m, r): 0.0 for b in BASES for m in ("snapkv", "criticalkv") for r in RATIOS}


def perturbation(q, k, v, mask, keep, w_o, scaling):
    """Per query head, mean over queries of ||(o - o') W_o^h||_1; q (1, H, n, D), k, v (1, H_kv, P, D),
    mask (1, H_kv, n, P) causal, keep (1, H_kv, P) bool."""
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    full = attention_probs(q, k, mask, scaling)[0]  # (H, n, P)
    kept = attention_probs(q, k, mask & keep[:, :, None], scaling)[0]
    delta = (full - kept) @ v[0].float().repeat_interleave(H // H_kv, 0)  # (H, n, D)
    w = w_o.float().t().reshape(H, D, -1)  # (H, D, hidden)
    return (delta @ w).abs().sum(-1).mean(-1)  # (H,)


for s in samples:
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    prompt = torch.cat([ctx, qst], 1)
    P = prompt.shape[1]
    rec = record_prefill(model, prompt)
    gen = greedy_generate(model, cache_from_record(model, Full(), rec), [], 8, eos, logits=rec.logits).tokens
    ans = torch.tensor([[t for t in gen if t not in eos]])
    full = cache_from_record(model, Full(), rec)
    answer_q = {}
    for i, layer in enumerate(full.layers):  # the answer tokens' queries, read with the full cache
        orig = layer.store.after_attention
        layer.store.after_attention = lambda step, i=i, orig=orig: (answer_q.setdefault(i, step.queries), orig(step))
    with torch.no_grad():
        model(ans, cache=full)
    print(f"depth {s['depth']}: full cache answers {tok.decode(ans[0]).strip()!r} (passkey {s['answer']})")
    for b, knobs, r in ((b, knobs, r) for b, knobs in BASES.items() for r in RATIOS):
        for m, method in (("snapkv", SnapKV(ratio=r, **knobs)),
                          ("criticalkv", CriticalKV(ratio=r, base=SnapKV(**knobs)))):
            c = cache_from_record(model, method, rec)
            for layer in range(L):
                held = c.layers[layer].store.kept_slots()  # (1, H_kv, b)
                k, v, q = rec.keys[layer], rec.values[layer], rec.queries[layer]
                keep = torch.zeros(k.shape[:3], dtype=torch.bool).scatter_(2, held, True)
                causal = torch.ones(P, P, dtype=torch.bool).tril()[P - W:].expand(1, k.shape[1], W, P)
                w_o = info.weights(layer)["o"]
                pert[b, m, r, "window"].append(perturbation(q[:, :, P - W:], k, v, causal, keep, w_o, rec.scaling))
                sees_all = torch.ones(1, k.shape[1], ans.shape[1], P, dtype=torch.bool)
                pert[b, m, r, "answer"].append(perturbation(answer_q[layer], k, v, sees_all, keep, w_o, rec.scaling))
            with torch.no_grad():  # how likely the full cache's answer stays (first token: same prefill logits)
                logits = model(ans[:, :-1], cache=c).logits[0]
            nll[b, m, r] += F.cross_entropy(logits.float(), ans[0, 1:]).item() / len(samples)

fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
print(f"{'SnapKV':9} {'queries':8} {'ratio':>5} {'CriticalKV perturbs less':>25} {'more':>6} {'total crit/snap':>16}")
for b in BASES:
    for j, qs in enumerate(("window", "answer")):
        for r in RATIOS:
            snap, crit = torch.cat(pert[b, "snapkv", r, qs]), torch.cat(pert[b, "criticalkv", r, qs])
            if r == 4:
                ax[j].loglog(snap, crit, ".", ms=3, alpha=0.5, label=f"{b} SnapKV, 4x")
            less, more = (crit < 0.999 * snap).float().mean(), (crit > 1.001 * snap).float().mean()  # else: a tie
            print(f"{b:9} {qs:8} {r:4d}x {less:25.0%} {more:6.0%} {crit.sum() / snap.sum():16.3f}")
for j, qs in enumerate(("window", "answer")):
    lo, hi = ax[j].get_xlim()
    ax[j].plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax[j].set_xlabel("perturbation, SnapKV"); ax[j].set_ylabel("perturbation, CriticalKV over SnapKV")
    ax[j].set_title(f"{qs} queries: one dot per (layer, head, prompt)"); ax[j].legend()
plt.tight_layout(); plt.show()
print("mean NLL of the full cache's answer tokens (after the first) under each compressed cache:")
for b in BASES:
    print(f"  {b:9}", "  ".join(f"{m} {r}x {nll[b, m, r]:.3f}" for m in ("snapkv", "criticalkv") for r in RATIOS))


# %% [markdown]
# ## What the paper reported, and what we see
# | | paper | here (SmolLM2-135M, two ~800-token passkey prompts, CPU) |
# |---|---|---|
# | observation | the output perturbation after eviction depends on the projected value norms as well as on attention; the two-stage selection gives lower output perturbation in over 92% of the attention heads of a Llama model (abstract, v1) | not reproduced at that scale: CriticalKV perturbs the projected output less than SnapKV alone in 32-46% of the (layer, head, prompt) cases with kvpress's pooled SnapKV (more in 52-64%), in 46-57% without pooling (more in 40-44%); the total perturbation moves by -5% to +5%. Two prompts, 30 layers x 9 heads each, GQA (3 query heads share a choice) |
# | quality | integrated with three eviction methods on three LLMs, more than halves the compression loss on average over 29 Ruler and LongBench datasets (abstract, v2) | NLL of the full cache's answer tokens: 2.002 vs 2.136 (4x) and 2.465 vs 2.505 (8x) for CriticalKV vs SnapKV with pooling, 2.390 vs 2.360 and 2.595 vs 2.611 without; two prompts, not a benchmark |

# %% [markdown]
# ## On the benchmark
# `kvatlas bench` ran it with every other family's methods on the passkey set: 30 prompts of ~1k tokens per cell,
# bf16, both settings, targets 2x, 4x and 8x against the 16-bit cache (`results/bench/passkey-families-30.jsonl`,
# the leaderboard's cells). Achieved ratios are measured from the held tensors.

# %%
from reference_impls.report import show_bench  # noqa: E402

_ = show_bench("criticalkv")
