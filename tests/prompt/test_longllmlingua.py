"""LongLLMLingua (arXiv 2310.06839): question-aware document ranking (Eq. 2), contrastive perplexity (Eq. 3),
dynamic ratios (Section 4.3) and reordering (Section 4.2), against plain forwards and the paper's formulas."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.generation import shorten_prompt
from reference_impls.prompt import LLMLingua, LongLLMLingua
from reference_impls.prompt.longllmlingua import contrastive_perplexity, dynamic_ratios


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def logp(model, x):
    lp = torch.log_softmax(model(x).logits[0].float(), -1)
    return torch.tensor([0.0] + [float(lp[t - 1, x[0, t]]) for t in range(1, x.shape[1])])


def test_dynamic_ratios_follow_the_papers_schedule():
    # tau_k = (1 - 2 I(r_k) / K') dtau + tau, clipped to [0, 1]
    r = dynamic_ratios(torch.arange(4), 4, 0.25, 0.3)
    assert torch.allclose(r, torch.tensor([0.55, 0.40, 0.25, 0.10], dtype=torch.float64))
    assert dynamic_ratios(torch.tensor([0]), 1, 0.9, 0.5).item() == 1.0


@torch.no_grad()
def test_contrastive_perplexity_is_the_difference_of_two_conditionals(tiny):
    q, prefix, seg = ids(6, seed=1), ids(10, seed=2), ids(8, seed=3)
    s = contrastive_perplexity(KVCache(tiny, LongLLMLingua()).model_info, q)(prefix, seg)
    plain = logp(tiny, torch.cat([prefix, seg], 1))[10:]
    cond = logp(tiny, torch.cat([q, prefix, seg], 1))[16:]
    assert torch.allclose(s, cond - plain, atol=1e-5)


@torch.no_grad()
def test_documents_are_ranked_by_the_questions_likelihood_and_reordered(tiny):
    x, q = ids(128, seed=4), ids(6, seed=5)
    score = torch.stack([logp(tiny, torch.cat([x[:, 32 * d: 32 * d + 32], q], 1))[-6:].mean() for d in range(4)])
    best = score.argsort(descending=True)[:2].tolist()  # most relevant first: the reordered prompt
    m = LongLLMLingua(ratio=2, coarse_extra=0, doc_tokens=32)
    short, _ = shorten_prompt(m, x, q, True, KVCache(tiny, m).model_info)
    assert short[0].tolist() == torch.cat([x[0, 32 * d: 32 * d + 32] for d in best]).tolist()


@torch.no_grad()
def test_query_agnostic_falls_back_to_llmlingua(tiny):
    x, q = ids(120, seed=6), ids(6, seed=7)
    info = KVCache(tiny, LLMLingua()).model_info
    a, _ = shorten_prompt(LongLLMLingua(ratio=3, segment=32, doc_tokens=32), x, q, False, info)
    b, _ = shorten_prompt(LLMLingua(ratio=3, segment=32, doc_tokens=32), x, q, False, info)
    assert torch.equal(a, b)
    c, _ = shorten_prompt(LongLLMLingua(ratio=3, segment=32, doc_tokens=32), x, q, True, info)
    assert c.shape == a.shape and not torch.equal(a, c)  # the question changes what is kept


def test_errors_name_the_knob():
    with pytest.raises(ValueError, match=r"dynamic must be in \[0, 1\]"):
        LongLLMLingua(dynamic=2)
