# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Attention that caches less by design: MHA, MQA, GQA, MLA, CLA, YOCO
#
# **What you will learn:** six attention layouts that shrink the KV cache before any compression method
# touches it, each a short module in `reference_impls.architectures`: what each one holds per token, its
# bytes per token measured from the held tensors (the same `nbytes` as every other method in the atlas) at a
# toy width and at three real shapes (SmolLM2-135M, Llama-3-8B, DeepSeek-V2), checked against the closed
# forms; MLA's absorbed form checked against its naive form; and the papers' numbers beside ours. What these
# layouts cost in recall after training is the subject of the architectures comparison notebook; this one is
# about the bytes.
#
# Elements held per token ($L$ layers, $H$ query heads, $H_{kv}$ KV heads of dimension $D$):
#
# | layout | what the cache holds | elements per token |
# |---|---|---|
# | MHA (reference) | a key and a value per head and layer | $2 L H D$ |
# | MQA (Shazeer, arXiv 1911.02150) | one key and one value per layer, read by every head | $2 L D$ |
# | GQA (Ainslie et al., arXiv 2305.13245) | one key and one value per group of $G = H / H_{kv}$ heads | $2 L H_{kv} D$ |
# | MLA (DeepSeek-V2, arXiv 2405.04434) | a latent $c$ ($d_c$) and one RoPE key ($d_R$) per layer | $L (d_c + d_R)$ |
# | CLA (Brandon et al., arXiv 2405.12981) | keys and values of every $s$-th layer only | $2 \lceil L / s \rceil H_{kv} D$ |
# | YOCO (Sun et al., arXiv 2405.05254) | one global key/value set, plus $L/2$ windows of $w$ tokens | $2 H_{kv} D$ (+ a constant $L w H_{kv} D$) |
#
# MLA's trick is linear algebra: the score of head $i$ against the cached latent $c_j$ is
#
# $$q_{t,i}^\top k_{j,i} = \big(W^{UK\top}_i q^C_{t,i}\big)^\top c_j + q^{R\top}_{t,i} k^R_j, \qquad
# o_{t,i} = W^{UV}_i \textstyle\sum_j p_{t,j,i}\, c_j ,$$
#
# so $W^{UK}$ folds into the query projection and $W^{UV}$ into the output projection ("absorbed"), and the
# heads attend to $[c; k^R]$ directly: at inference MLA is multi-query attention over the latent.

# %%
import matplotlib.pyplot as plt
import torch

from reference_impls.architectures import ArchConfig, TinyLM, build
from reference_impls.architectures import cla, gqa, mha, mla, mqa, yoco

ARCHS = ["mha", "mqa", "gqa", "mla", "cla", "yoco"]
CLOSED = {"mha": mha.cache_bytes, "mqa": mqa.cache_bytes, "gqa": gqa.cache_bytes, "mla": mla.cache_bytes,
          "cla": cla.cache_bytes, "yoco": yoco.cache_bytes}  # (cfg, seq_len, dtype_bytes) -> bytes


def measure(arch: str, cfg: ArchConfig, T: int, device: str = "cpu") -> int:
    """Bytes the caches hold after a T-token prefill, in bf16 (the atlas's 16-bit unit)."""
    with torch.device(device), torch.no_grad():
        torch.manual_seed(0)
        lm = build(arch, cfg).to(torch.bfloat16)
        caches = lm.new_caches(1)
        lm.step(torch.zeros(1, T, dtype=torch.long), caches)
    return lm.cache_nbytes(caches)


# %% [markdown]
# ## A check: the parallel form equals decoding with the cache, and absorbed MLA equals naive MLA
# The toy config: width 64, 4 layers, 4 heads of 16, a 32-token window (YOCO's self-decoder), fp32. The
# 48-token sequence is longer than the window, so the rolling buffer is exercised.

# %%
cfg = ArchConfig()
print(cfg)
ids = torch.randint(0, cfg.vocab, (2, 48), generator=torch.Generator().manual_seed(0))
for arch in ARCHS:
    torch.manual_seed(0)
    lm = build(arch, cfg)
    with torch.no_grad():
        caches = lm.new_caches(2)
        inc = torch.cat([lm.step(ids[:, t:t + 1], caches) for t in range(ids.shape[1])], 1)
        print(f"{arch:5s} max |forward - step by step| = {(lm(ids) - inc).abs().max():.1e}")

torch.manual_seed(0)
naive, absorbed = TinyLM(cfg, mla.make(cfg)), TinyLM(cfg, mla.make(cfg, absorbed=True))
absorbed.load_state_dict(naive.state_dict())
with torch.no_grad():
    gap = (naive(ids) - absorbed(ids)).abs().max().item()
print(f"MLA: max |naive - absorbed| = {gap:.1e} (fp32)")
assert gap < 1e-5

# %% [markdown]
# ## Bytes per token at the toy width, measured and closed form
# The same six models prefill T tokens in bf16; the table prints the held bytes per token. Every measurement
# equals the module's closed form (asserted). YOCO's per-token cost falls with T: its self-decoder windows
# stop growing at 32 tokens, and only the one global cache keeps growing.

# %%
LENGTHS = [1, 16, 32, 100, 256]
print(f"{'arch':5s}" + "".join(f"{'T=' + str(T):>9s}" for T in LENGTHS) + "   (bytes per token, bf16)")
for arch in ARCHS:
    row = []
    for T in LENGTHS:
        got = measure(arch, cfg, T)
        assert got == CLOSED[arch](cfg, T, 2), (arch, T, got)
        row.append(got / T)
    print(f"{arch:5s}" + "".join(f"{b:9.1f}" for b in row))

# %% [markdown]
# ## At real shapes
# The same modules at three real shapes, built on PyTorch's `meta` device: tensors with shapes and dtypes
# but no storage, so a 60-layer, 128-head model costs nothing to build while its caches still report their
# bytes (nothing is computed, so a 32768-token prefill costs nothing either). Measurements after 8 and after
# 32768 tokens are asserted equal to the closed forms; the table gives the one at 32768 tokens. GQA, CLA and
# YOCO use the shape's KV heads (8 for the DeepSeek-V2 shape, whose real model uses MLA); CLA shares pairs of
# layers; YOCO's window is 4096 tokens (our choice); MLA uses DeepSeek-V2's ratios $d_c = 4D$, $d_R = D/2$
# (at the DeepSeek-V2 shape: its 512 and 64). SmolLM2 has 9 heads, so GQA there is its own 3 KV heads.

# %%
SHAPES = {  # only what the cache depends on (the MLP width and vocabulary do not change it)
    "SmolLM2-135M": ArchConfig(d_model=576, n_layers=30, n_heads=9, head_dim=64, n_kv_heads=3, window=4096),
    "Llama-3-8B": ArchConfig(d_model=4096, n_layers=32, n_heads=32, head_dim=128, n_kv_heads=8, window=4096),
    "DeepSeek-V2": ArchConfig(d_model=5120, n_layers=60, n_heads=128, head_dim=128, n_kv_heads=8, window=4096),
}
LONG = 32768
per_token = {}  # (shape, arch) -> bytes per token at LONG tokens, 16-bit
print(f"{'shape':13s}" + "".join(f"{a:>10s}" for a in ARCHS) + "   (KiB per token, measured at 32768 tokens)")
for name, shape in SHAPES.items():
    for arch in ARCHS:
        for T in (8, LONG):
            got = measure(arch, shape, T, device="meta")
            assert got == CLOSED[arch](shape, T, 2), (name, arch, T)
        per_token[name, arch] = got / LONG
    print(f"{name:13s}" + "".join(f"{per_token[name, a] / 1024:10.2f}" for a in ARCHS))
print("\nfraction of MHA's cache at the same shape:")
for name in SHAPES:
    print(f"{name:13s}" + "".join(f"{per_token[name, a] / per_token[name, 'mha']:10.4f}" for a in ARCHS))

# %%
fig, ax = plt.subplots(figsize=(9, 3.8))
width = 0.8 / len(SHAPES)
for k, name in enumerate(SHAPES):
    frac = [per_token[name, a] / per_token[name, "mha"] for a in ARCHS]
    ax.bar([i + (k - 1) * width for i in range(len(ARCHS))], frac, width, label=name)
ax.set_xticks(range(len(ARCHS)), [a.upper() for a in ARCHS])
ax.set_yscale("log")
ax.set_ylabel("KV bytes per token / MHA's")
ax.set_title(f"KV cache per token after {LONG} tokens, measured at three real shapes")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The papers' claims in bytes
# **MLA vs DeepSeek 67B (93.3% less cache, abstract).** DeepSeek 67B is a GQA model with 95 layers and 8 KV
# heads of 128 (DeepSeek LLM, arXiv 2401.02954, Table 2). The layouts alone account for part of the claim;
# the rest matches the paper's deployment, which stores each KV-cache element in about 6 bits on average
# (DeepSeek-V2, Section 3.2.3) against 16 bits for the 67B model.
#
# **CLA's Table 1 bytes.** A 1B model with head dimension 128 and 20 layers of 16 heads (any split with
# layers × heads = 320 gives the same bytes) reproduces the paper's 163840 bytes per token for MHA and
# 5120 for MQA-CLA2.

# %%
ds67b = ArchConfig(d_model=8192, n_layers=95, n_heads=64, head_dim=128, n_kv_heads=8)
v2 = SHAPES["DeepSeek-V2"]
e67, ev2 = mha.bytes_per_token(ds67b, 1, n_kv_heads=8), mla.bytes_per_token(v2, 1)  # elements per token
print(f"elements per token: DeepSeek 67B (GQA) {e67}, DeepSeek-V2 (MLA) {ev2} = {ev2 // 60} per layer")
print(f"reduction, both 16-bit: {1 - ev2 / e67:.3f}; V2 at 6 bits per element: {1 - ev2 * 6 / (e67 * 16):.3f}")

one_b = ArchConfig(d_model=2048, n_layers=20, n_heads=16, head_dim=128, n_kv_heads=1)
cla_b, mha_b, mqa_b = (measure(a, one_b, 8, "meta") / 8 for a in ("cla", "mha", "mqa"))
print(f"1B shape, bytes per token: MHA {mha_b:.0f}, MQA {mqa_b:.0f}, MQA-CLA2 {cla_b:.0f} "
      f"(CLA2 / MQA = {cla_b / mqa_b:.2f}, / MHA = {cla_b / mha_b:.5f})")

llama = SHAPES["Llama-3-8B"]
for T in (4096, LONG, 131072):
    print(f"Llama-3-8B shape, {T} tokens: YOCO / MHA = {yoco.cache_bytes(llama, T) / mha.cache_bytes(llama, T):.4f}, "
          f"YOCO / GQA = {yoco.cache_bytes(llama, T) / gqa.cache_bytes(llama, T):.4f}")

# %% [markdown]
# ## What the papers reported, and what we measure
# Our numbers are bytes only, from the held tensors of untrained modules; the papers' quality numbers come
# from trained models, which this notebook does not reproduce (the comparison notebook trains the tiny
# versions on a synthetic recall suite).
#
# | | paper | here |
# |---|---|---|
# | MLA cache | 93.3% less KV cache than DeepSeek 67B (abstract); 512 latent + 64 RoPE values per token and layer | the layouts alone: 0.822 less (34560 vs 194560 elements per token); counting V2's elements at 6 bits: 0.933, the paper's figure |
# | MLA absorbed | the up-projections fold into the query and output projections, so inference reads the latent only (Section 2.1) | absorbed == naive to 1e-5 in fp32 (printed gap above), both reading the same cache of latent + RoPE key |
# | MLA quality | small MoE: MMLU 50.0 with MLA vs 48.7 with MHA at 15.6K vs 110.6K KV elements per token (Table 9, v5) | not measured here (bytes only) |
# | GQA | GQA-8 of 64 heads: average 47.1 vs 47.2 for MHA on T5-XXL after 5% uptraining (Table 1, v3) | at the Llama-3-8B shape GQA holds 0.25 of MHA's bytes (8 of 32 KV heads); quality: see the comparison notebook |
# | CLA | 2x less cache than MQA at nearly equal accuracy (abstract); 1B models: 5120 bytes per token for MQA-CLA2 vs 163840 for MHA, perplexity 13.6 vs 13.15 (Table 1) | the same bytes measured: 5120 vs 163840 per token, CLA2 / MQA = 0.50 |
# | YOCO | one global KV cache; needle retrieval to 1M tokens (abstract); perplexity 3.553 (SWA) vs 3.564 for a Transformer at 160M (Table 5) | at the Llama-3-8B shape (8 KV heads) with a 4096-token window, YOCO holds 0.0234 of MHA's cache at 32768 tokens and 0.0117 at 131072 (0.0938 and 0.0469 of GQA's): the windows are a constant, the one global cache is what grows |
# | MQA | one KV head per layer; the taxonomy entry records no verified numbers | MQA holds 1/H of MHA: 0.0312 at the Llama-3-8B shape |
