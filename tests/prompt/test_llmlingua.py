"""LLMLingua (arXiv 2310.05736): the budget controller (Algorithm 1) and iterative token-level compression
(Algorithm 2), checked against plain forwards of the model and hand-written loops."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.generation import shorten_prompt
from reference_impls.prompt import LLMLingua
from reference_impls.prompt.llmlingua import itpc_keep


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def nll(model, x):
    logp = torch.log_softmax(model(x).logits[0].float(), -1)
    return torch.tensor([0.0] + [-float(logp[t - 1, x[0, t]]) for t in range(1, x.shape[1])])


@torch.no_grad()
def test_itpc_scores_each_segment_given_the_compressed_prefix(tiny):
    """Algorithm 2 as a plain loop: segment j's tokens scored by a forward over (kept so far + segment j)."""
    x, keep, seg = ids(50), 20, 16
    kept, prefix = [], torch.zeros(1, 0, dtype=torch.long)
    for j, start in enumerate(range(0, 50, seg)):
        s = x[:, start:start + seg]
        info = nll(tiny, torch.cat([prefix, s], dim=1))[prefix.shape[1]:]
        k = round(keep * min(start + seg, 50) / 50) - len(kept)
        top = sorted(info.topk(k).indices.tolist())
        kept += [start + t for t in top]
        prefix = torch.cat([prefix, s[:, top]], dim=1)
    cache = KVCache(tiny, LLMLingua(ratio=2.5, segment=seg, coarse_extra=None))
    short, elided = shorten_prompt(cache.method, x, None, False, cache.model_info)
    assert short[0].tolist() == x[0, kept].tolist() and elided == 30


@torch.no_grad()
def test_budget_controller_keeps_the_highest_perplexity_documents(tiny):
    """Without a tokenizer sentences are 16-token runs; documents of 32 tokens are pairs of them."""
    x = ids(128, seed=2)
    ppl = nll(tiny, x).view(4, 32).mean(1)
    best = sorted(ppl.argsort(descending=True)[:2].tolist())
    m = LLMLingua(ratio=2, coarse_extra=0, doc_tokens=32)  # budget 64 = two documents: the fine stage has nothing to do
    short, _ = shorten_prompt(m, x, None, False, KVCache(tiny, m).model_info)
    assert short[0].tolist() == torch.cat([x[0, 32 * d: 32 * d + 32] for d in best]).tolist()


@torch.no_grad()
@pytest.mark.parametrize("ratio", [1.5, 3, 8])
def test_the_kept_count_is_the_target_exactly(tiny, ratio):
    x = ids(120, seed=5)
    m = LLMLingua.from_ratio(ratio, segment=32, doc_tokens=32)
    short, elided = shorten_prompt(m, x, None, False, KVCache(tiny, m).model_info)
    assert short.shape[1] == round(120 / ratio) and elided == 120 - short.shape[1]


def test_itpc_share_weights_the_segments():
    score = lambda prefix, seg: seg[0].float()  # noqa: E731  (keep the largest ids)
    x = torch.arange(1, 41)[None]
    share = torch.cat([torch.ones(20), torch.zeros(20)])  # the whole budget goes to the first half
    keep = itpc_keep(x, 10, score, segment=10, share=share)
    assert keep[5:10].all() and keep[15:20].all() and keep.sum() == 10  # each segment of the first half keeps 5


def test_errors_name_the_knob():
    with pytest.raises(ValueError, match="segment must be a positive int"):
        LLMLingua(segment=0)
    with pytest.raises(ValueError, match="coarse_extra must be an int >= 0 or None"):
        LLMLingua(coarse_extra=-1)
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        LLMLingua(ratio=0)
