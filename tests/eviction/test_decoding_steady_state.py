"""The decoding fast path of `EvictingStore` (one token in, one out per head: `drop_lowest`, `take_rows`, the
all-visible mask of a dense decoding step) keeps exactly what the general path keeps, logits bit for bit."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import base
from reference_impls.eviction.base import EvictionMethod, drop_lowest, keep_top, take_rows
from reference_impls.eviction.h2o import H2O
from reference_impls.eviction.keyformer import Keyformer
from reference_impls.eviction.scissorhands import Scissorhands
from reference_impls.eviction.streamingllm import StreamingLLM
from reference_impls.eviction.tova import TOVA
from reference_impls.merging.cam import CaM

from evict_checks import ids


@dataclass
class Tied(EvictionMethod):
    """Toy scorer whose scores all tie, evicting while decoding: the fast path must always step aside."""

    evict_while_decoding = True

    def score(self, step, history, budget):
        return torch.zeros(step.positions.shape)


@torch.no_grad()
def decode(model, method, steps):
    """Prefill 30 tokens, decode `steps` greedy ones; every step's logits and the kept slots of every layer."""
    cache = KVCache(model, method)
    logits = model(ids(30, seed=7), cache=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
        out.append((logits, [layer.store.kept_slots().clone() for layer in cache.layers]))
    return out


METHODS = [StreamingLLM(budget=12), H2O(budget=12), TOVA(budget=12), Scissorhands(budget=12, history_window=8),
           Keyformer(budget=12), CaM(budget=12), H2O(budget=12, layers="pyramid"), Tied(budget=12)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_fast_path_keeps_what_the_general_path_keeps(tiny, method, monkeypatch):
    taken = []

    def counted(scores):
        idx = drop_lowest(scores)
        taken.append(idx is not None)
        return idx

    monkeypatch.setattr(base, "drop_lowest", counted)
    fast = decode(tiny, method, steps=40)
    monkeypatch.setattr(base, "drop_lowest", lambda scores: None)  # every step through keep_top, as before
    general = decode(tiny, method, steps=40)
    for s, ((lf, kf), (lg, kg)) in enumerate(zip(fast, general)):
        assert torch.equal(lf, lg), s
        assert all(torch.equal(a, b) for a, b in zip(kf, kg)), s
    if isinstance(method, Tied):
        assert taken and not any(taken)  # ties: the fast path always stepped aside
    else:
        assert sum(taken) >= 0.9 * 40 * len(tiny.model.layers)  # it did run (a tie now and then steps aside)


def test_drop_lowest_equals_keep_top_minus_one():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 5, 40):
        s = torch.randn(3, 4, T, generator=g)
        s[0, 0, min(1, T - 1)] = float("-inf")  # a -inf lowest is still unique
        idx = drop_lowest(s)
        ref, hole = keep_top(s, torch.full((3, 4), T - 1))
        assert torch.equal(idx, ref) and not hole.any()
        for b in range(3):
            for h in range(4):  # a plain rule: every index but the argmin, ascending
                low = min(range(T), key=lambda t: s[b, h, t].item())
                assert idx[b, h].tolist() == [t for t in range(T) if t != low]
    tied = torch.tensor([[[3.0, 1.0, 2.0, 1.0]]])
    assert drop_lowest(tied) is None  # which of the tied ones top-k leaves out is its own business


def test_take_rows_equals_advanced_indexing():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 9, (2, 3, 5), generator=g)
    b, h = torch.arange(2)[:, None, None], torch.arange(3)[None, :, None]
    for x in (torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 9, 3, 4, generator=g).transpose(1, 2),
              torch.randint(0, 255, (2, 3, 9, 2), dtype=torch.uint8, generator=g), torch.randn(2, 3, 9, generator=g)):
        assert torch.equal(take_rows(x, idx), x[b, h, idx])


@torch.no_grad()
def test_the_mask_handed_to_a_dense_decoding_step_is_the_one_it_would_build(tiny):
    cache = KVCache(tiny, StreamingLLM(budget=12))
    seen = []
    store = cache.layers[0].store
    orig = store.after_attention

    def spy(step):
        if step.q_len == 1:
            seen.append((step._mask.clone(), dataclasses.replace(step, _mask=None).mask))
        orig(step)

    store.after_attention = spy
    tiny(ids(30), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in seen)


@torch.no_grad()
def test_a_compressing_pass_of_one_token_sets_a_new_budget_instead(tiny):
    """Re-armed on a one-token pass, the store re-budgets (round(n / ratio), now above what it holds): nothing goes."""
    cache = KVCache(tiny, StreamingLLM(ratio=2))
    tiny(ids(30), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    held = cache.layers[0].store.kept_slots().shape[-1]  # 15: the budget of the 30-token prompt
    cache.compress_next = True
    tiny(torch.tensor([[9]]), cache=cache)  # 34 seen: the budget becomes 17 > 16 held
    assert cache.layers[0].store.kept_slots().shape[-1] == held + 1
