"""Peer check: our primitives against optimum-quanto, the backend of transformers' `QuantizedCache`.

Where the schemes coincide they agree to fp32 rounding: quanto's `axis=0` groups G consecutive elements of the
last dim (our per-token groups, dim=-1: FlexGen, KIVI values) and `axis=-1` groups G consecutive rows of the
flattened (B*H*T) dim per channel (our per-channel token groups, dim=2, KIVI keys, when G divides T). Both use
min-max asymmetric rounding with a float offset. They differ in fp16: quanto computes scale and offset in fp16,
we in fp32 (rounded to fp16 for storage), so a few elements at a rounding tie land one code apart.
At cache level, transformers' QuantizedCache with residual_length=1 re-quantizes everything each step (its
window flushes at once) and then holds what FlexGen holds; with its default window of 128 it is KIVI-like
residual handling but with one axis and group size for keys and values (its docstring says so).
"""

import pytest
import torch

quanto = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install optimum-quanto)")

from reference_impls import KVCache  # noqa: E402
from reference_impls.quantization import FlexGen, choose_qparams, dequantize, quantize  # noqa: E402

QTYPES = {2: quanto.qint2, 4: quanto.qint4}


def quanto_round_trip(x, bits, axis, G):
    scale, shift = quanto.MaxOptimizer()(x, QTYPES[bits], axis, G)
    return quanto.quantize_weight(x, QTYPES[bits], axis, scale, shift, G).dequantize()


def ours(x, bits, dim, G):
    s, z = choose_qparams(x, bits=bits, dim=dim, group_size=G)
    return dequantize(quantize(x, s, z, bits=bits, dim=dim, group_size=G), s, z, dim=dim, group_size=G, dtype=x.dtype)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("G", [16, 32, 64])
def test_per_token_groups_equal_quanto_axis0(bits, G):
    x = torch.randn(2, 3, 37, 64, generator=torch.Generator().manual_seed(G + bits))
    assert torch.allclose(ours(x, bits, -1, G), quanto_round_trip(x, bits, 0, G), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_channel_token_groups_equal_quanto_axis_minus1(bits):
    x = torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(bits))
    x[..., 3] *= 30  # an outlier channel
    assert torch.allclose(ours(x, bits, 2, 32), quanto_round_trip(x, bits, -1, 32), atol=1e-5, rtol=0)


def test_fp16_agrees_within_one_code():
    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(7)).half()
    a, b = ours(x, 4, -1, 32).float(), quanto_round_trip(x, 4, 0, 32).float()
    step = choose_qparams(x, bits=4, dim=-1, group_size=32)[0].float().repeat_interleave(32, -1)
    diff = (a - b).abs()
    assert bool((diff <= step * 1.01 + 1e-3).all())
    assert float((diff > step / 2).float().mean()) < 0.01  # rounding ties only


@torch.no_grad()
def test_quantized_cache_quanto_residual_1_matches_flexgen(tiny):
    from transformers import QuantizedCache

    x = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    theirs = QuantizedCache(backend="quanto", config=tiny.config, nbits=4, axis_key=0, axis_value=0,
                            q_group_size=16, residual_length=1)
    mine = KVCache(tiny, FlexGen(bits=4, group_size=16))  # head_dim 16: one group per token
    a, b = tiny(x, cache=theirs).logits, tiny(x, cache=mine).logits
    assert torch.allclose(a, b, atol=1e-5)
    for t in (5, 9, 17, 33):
        nxt = torch.tensor([[t]])
        a, b = tiny(nxt, cache=theirs).logits, tiny(nxt, cache=mine).logits
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
