"""Selective Context (arXiv 2310.06201): units with the least self-information are dropped; checked against a plain
forward of the model and a hand-written ranking."""

import pytest
import torch

from reference_impls import Full, KVCache
from reference_impls.generation import greedy_generate, shorten_prompt
from reference_impls.prompt import SelectiveContext


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def plain_information(model, x):
    """-log p(x_t | x_<t) from a plain forward, 0 for the first token (Eq. 1)."""
    logp = torch.log_softmax(model(x).logits[0].float(), -1)
    return torch.tensor([0.0] + [-float(logp[t - 1, x[0, t]]) for t in range(1, x.shape[1])])


@torch.no_grad()
@pytest.mark.parametrize("ratio", [2, 3, 5])
def test_token_level_keeps_the_most_informative_tokens(tiny, ratio):
    x = ids(60)
    cache = KVCache(tiny, SelectiveContext(ratio=ratio, unit="token"))
    short, elided = shorten_prompt(cache.method, x, None, False, cache.model_info)
    info = plain_information(tiny, x)
    keep = round(60 / ratio)
    expect = sorted(info.argsort(descending=True, stable=True)[:keep].tolist())
    assert short[0].tolist() == x[0, expect].tolist() and elided == 60 - keep


@torch.no_grad()
def test_sentence_level_ranks_units_by_their_total_information(tiny):
    """Without a tokenizer a 'sentence' is a run of 16 tokens; Eq. 3 sums the tokens' information."""
    x = ids(64, seed=3)
    info = plain_information(tiny, x)
    totals = info.view(4, 16).sum(1)
    best = sorted(totals.argsort(descending=True)[:2].tolist())
    cache = KVCache(tiny, SelectiveContext(ratio=2))
    short, _ = shorten_prompt(cache.method, x, None, False, cache.model_info)
    assert short[0].tolist() == torch.cat([x[0, 16 * u: 16 * u + 16] for u in best]).tolist()


@torch.no_grad()
def test_ratio_one_is_the_full_cache_and_bytes_are_the_shorter_prompts(tiny):
    x, q = ids(50), ids(5, seed=1)
    full = greedy_generate(tiny, KVCache(tiny, Full()), [x, q], 4)
    cache = KVCache(tiny, SelectiveContext(ratio=1))
    short, cache.elided = shorten_prompt(cache.method, x, q, True, cache.model_info)
    assert short is x and greedy_generate(tiny, cache, [x, q], 4).tokens == full.tokens
    cache = KVCache(tiny, SelectiveContext.from_ratio(4, unit="token"))
    short, cache.elided = shorten_prompt(cache.method, x, None, False, cache.model_info)
    gen = greedy_generate(tiny, cache, [short, q], 4)
    assert gen.full_kv_bytes == full.full_kv_bytes
    assert gen.kv_bytes == full.kv_bytes * short.shape[1] // 50  # measured after the context: only its kept tokens


def test_errors_name_the_knob():
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        SelectiveContext(ratio=0.5)
    with pytest.raises(ValueError, match="unit must be one of sentence, token"):
        SelectiveContext(unit="phrase")
