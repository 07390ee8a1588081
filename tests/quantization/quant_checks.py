"""Helpers shared by the quantization tests: token ids for the tiny Llama, and feeding a store by hand."""

import torch

from reference_impls.base import Model, Step

MODEL = Model()  # what a store may ask of the model: nothing here (one layer, no RoPE, no tokenizer)


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def drive(store, k, v, chunks):
    """Feed a store (k, v) chunk by chunk as the cache does, the first chunk being the compressing pass.

    Returns the (keys, values) the store handed attention for each chunk."""
    t, outs = 0, []
    for i, q in enumerate(chunks):
        kk, vv, slots = store.append(k[:, :, t:t + q], v[:, :, t:t + q])
        outs.append((kk, vv))
        B, H, T, D = kk.shape
        store.after_attention(Step.dense(torch.zeros(B, H, q, D), kk, vv, scaling=1.0, compress=i == 0))
        t += q
    return outs


def after(store, keys, values, q, compress=True):
    """Tell a store driven by hand about the attention over `keys` by its last q tokens."""
    store.after_attention(Step.dense(keys[:, :, -q:], keys, values, compress=compress))
