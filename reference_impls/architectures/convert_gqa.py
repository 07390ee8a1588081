"""GQA conversion: mean-pool the key and value heads of each group of a trained checkpoint, before any uptraining.

Paper: Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón, Sanghai, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints", arXiv 2305.13245 (EMNLP 2023), Section 2.1 (uptraining: the
key and value projection matrices of the heads of a group are mean-pooled into one head, then the model is trained
further on 5% of its pre-training steps) and 2.2 (grouped-query attention: query head h reads KV head
floor(h G' / H), G' groups).
Official code: none (the paper's experiments use T5X); the conversion is these few lines.

For a Llama-style layer, K = x W_k^T with W_k (H_kv D, d) as nn.Linear holds it, head after head. Pooling to
n KV heads averages each run of m = H_kv / n consecutive heads:

    W_k'[j] = (1/m) sum_{i < m} W_k[j m + i]      (D, d) blocks, j < n;  same for W_v (and a bias, if any)

Query head h read KV head h // (H / H_kv) before and reads h // (H / n) after, which is the pooled head of the
group that held its old head (consecutive heads pool together), so W_q and W_o are unchanged. A model whose m
pooled heads were already equal is unchanged; the cache holds n / H_kv of the bytes, measured by any KV method
(`Full`) on the converted copy.

Deviations: (1) No uptraining: the conversion is measured as is (the paper uptrains on 5% of the pre-training
steps to recover quality; its ablations, Section 3.3, vary the conversion and the uptraining proportion). (2) The
paper converts multi-head T5 checkpoints; here the source is already GQA (SmolLM2-135M: 3 KV heads for 9 query
heads), and pooling it to one KV head gives MQA.
Bytes: 2 L n D per token and batch row, in the model's dtype (`bytes_per_token`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["bytes_per_token", "pool_heads", "pool_kv_heads"]


def pool_heads(w: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Mean of each run of n_heads / n_kv_heads consecutive heads: w (n_heads D, ...) -> (n_kv_heads D, ...)."""
    m = n_heads // n_kv_heads
    return w.reshape(n_kv_heads, m, w.shape[0] // n_heads, *w.shape[1:]).mean(dim=1).reshape(-1, *w.shape[1:])


def _pooled_linear(lin: nn.Linear, n_heads: int, n_kv_heads: int) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features * n_kv_heads // n_heads, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():  # averaged in fp32: a bf16 mean of 3 rounds once more than it needs to
        out.weight.copy_(pool_heads(lin.weight.float(), n_heads, n_kv_heads))
        if lin.bias is not None:
            out.bias.copy_(pool_heads(lin.bias.float(), n_heads, n_kv_heads))
    return out


def pool_kv_heads(model, n_kv_heads: int):
    """A copy of a Llama-style causal LM (transformers: `model.model.layers[i].self_attn` with k_proj, v_proj) whose
    key and value heads are mean-pooled into `n_kv_heads` heads per layer; `model` is left as it was.

    Raises ValueError when n_kv_heads is not an int in [1, H_kv] dividing the model's H_kv.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    H_kv = config.num_key_value_heads
    if not (isinstance(n_kv_heads, int) and 1 <= n_kv_heads <= H_kv and H_kv % n_kv_heads == 0):
        divisors = [d for d in range(1, H_kv + 1) if H_kv % d == 0]
        raise ValueError(f"pool_kv_heads: n_kv_heads must divide the model's {H_kv} KV heads (one of {divisors}), "
                         f"got {n_kv_heads!r}")
    out = copy.deepcopy(model)
    if getattr(out.config, "_name_or_path", ""):  # its own name: calibration prefills are cached on disk by name
        out.config._name_or_path += f"+gqa-{n_kv_heads}"
    decoder = out.get_decoder() if hasattr(out, "get_decoder") else out.model
    for layer in decoder.layers:
        attn = layer.self_attn
        attn.k_proj = _pooled_linear(attn.k_proj, H_kv, n_kv_heads)
        attn.v_proj = _pooled_linear(attn.v_proj, H_kv, n_kv_heads)
        attn.num_key_value_groups = config.num_attention_heads // n_kv_heads  # read by eager attention's repeat_kv
    out_config = out.config.get_text_config() if hasattr(out.config, "get_text_config") else out.config
    out_config.num_key_value_heads = n_kv_heads
    return out


def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Closed form of a dense cache's bytes per token (one batch row): keys and values of every layer."""
    return 2 * num_layers * n_kv_heads * head_dim * dtype_bytes
