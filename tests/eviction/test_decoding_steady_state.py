"""The decoding fast path of `EvictingStore` (one token in, one out per head: `drop_lowest`, `take_rows`, the
all-visible mask of a dense decoding step) keeps exactly what the general path keeps, logits bit for bit."""

from dataclasses import dataclass

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import base
from reference_impls.eviction.adakv import AdaKV
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


def causal_mask(step):
    """The mask by its definition (`Step.mask`): causal by position, real keys, real queries."""
    qp = step.q_positions[:, None, :, None]
    return (step.positions[:, :, None, :] <= qp) & (step.positions >= 0)[:, :, None, :] & (qp >= 0)


@pytest.mark.parametrize("method", [StreamingLLM(budget=12), AdaKV(budget=12, window=4)], ids=["dense", "holes"])
@torch.no_grad()
def test_the_mask_of_a_decoding_step_is_the_one_its_definition_gives(tiny, method):
    """A dense decoding step (no holes) is marked all-visible and its mask, built on demand, is all True; one with
    holes (Ada-KV's per-head counts) gets the real keys: both equal the causal mask built from the positions."""
    cache = KVCache(tiny, method)
    seen = []
    for layer in cache.layers:
        def spy(step, orig=layer.store.after_attention):
            if step.q_len == 1:
                seen.append((step.all_visible, step.attn_mask is None, step.mask.clone(), causal_mask(step),
                             bool(step.valid.all())))
            orig(step)

        layer.store.after_attention = spy
    tiny(ids(30, seed=3), cache=cache)
    for t in range(3):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    assert len(seen) == 3 * len(cache.layers) and all(torch.equal(mask, ref) for _, _, mask, ref, _ in seen)
    assert all(visible == none == all_valid for visible, none, _, _, all_valid in seen)  # marked iff no holes
    assert all(s[0] for s in seen) if isinstance(method, StreamingLLM) else not all(s[0] for s in seen)


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


@torch.no_grad()
def test_a_flat_store_decodes_through_a_tail_as_the_padded_layout_does(tiny):
    """Ada-KV's heads keep different counts, so the store holds them flat; decoded tokens go to a dense tail instead
    of the flat part being rebuilt every step. Same logits as a store that stays padded (to rounding: its empty slots
    sit elsewhere in the row), the same tokens held, bytes the held tokens' own; a compressing pass re-armed
    while the tail is there gathers from the layout its step saw and keeps the layer's new budget. (Which tokens it
    keeps may differ from the padded store's: SnapKV pools its scores along the slots, and the empty slots sit
    elsewhere.)"""

    @dataclass
    class Padded(AdaKV):
        def new_layer(self, layer_idx, model):
            return base.EvictingStore(self, layer_idx, model, varlen=False)

    def held(cache):
        return [[set(s[0, h][s[0, h] >= 0].tolist()) for h in range(s.shape[1])]
                for s in (layer.store.kept_slots() for layer in cache.layers)]

    flat, padded = KVCache(tiny, AdaKV(budget=12, window=4)), KVCache(tiny, Padded(budget=12, window=4))
    x = ids(30, seed=3)
    lf, lp = tiny(x, cache=flat).logits[:, -1], tiny(x, cache=padded).logits[:, -1]
    for step in range(8):
        if step == 6:  # re-armed: 36 tokens seen, a new budget of 12 per head (Ada-KV splits it anew)
            flat.compress_next = padded.compress_next = True
        token = lf.argmax(-1, keepdim=True)
        lf, lp = tiny(token, cache=flat).logits[:, -1], tiny(token, cache=padded).logits[:, -1]
        assert torch.allclose(lf, lp, atol=1e-5, rtol=0) or step == 7, step  # after the re-arm, held sets differ
        assert held(flat) == held(padded) or step >= 6, step
        if step == 5:
            store = flat.layers[0].store
            assert store.counts is not None and store.tail[0].shape[2] == 6  # the flat part untouched since the prompt
            D, size = store.tail[0].shape[-1], store.tail[0].element_size()
            assert store.nbytes() == int((store.kept_slots() >= 0).sum()) * (2 * D * size + 4) + store.counts.nbytes
    for layer in flat.layers:  # re-armed: flattened anew (one token decoded since), H_kv * 12 held (+ that token)
        store = layer.store
        assert store.tail is None or store.tail[0].shape[2] == 1
        assert int((store.kept_slots() >= 0).sum()) == 2 * 12 + 2 * (store.tail is not None)
