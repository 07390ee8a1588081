"""ChunkKV (arXiv 2502.00299): chunk aggregates, whole chunks kept beside the window, the budget, padding, decoding."""

from dataclasses import dataclass

import pytest
import torch

from reference_impls import KVCache
from reference_impls.eviction import EvictionMethod, SnapKV
from reference_impls.eviction.chunkkv import ChunkKV, chunk_scores
from reference_impls.methods import make_method
from reference_impls.models import tiny_llama

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, decode_matches_reference, ids,
                          kept_counts_equal_budget, left_padded_batch_equals_batch_one, spy)


@dataclass
class Wave(EvictionMethod):
    """A toy base scorer that differs per head and protects its last `win` tokens (a stand-in for SnapKV)."""

    win: int = 6

    @property
    def window(self):
        return self.win

    def score(self, step, history, budget):
        return torch.sin(0.7 * step.positions.float()) * (1.5 + step.keys[..., 0])


@pytest.mark.parametrize("reduce,shared", [("mean", True), ("sum", True), ("mean", False), ("sum", False)])
def test_chunk_aggregates_equal_a_loop_over_chunks(reduce, shared):
    g = torch.Generator().manual_seed(0)
    B, H, T, c = 2, 3, 23, 4
    scores = torch.randn(B, H, T, generator=g)
    pos = torch.arange(T).expand(B, H, T).clone()
    pos[1, :, :5] = -1  # left padding of row 1
    pos[:, :, -3:] = -1  # a window outside every chunk
    ours = chunk_scores(scores, pos, c, reduce=reduce, shared_heads=shared)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                p = int(pos[b, h, t])
                if p < 0:
                    assert ours[b, h, t] == float("-inf")
                    continue
                heads = range(H) if shared else [h]
                members = [float(scores[b, hh, j]) for hh in heads for j in range(T) if pos[b, hh, j] >= 0
                           and pos[b, hh, j] // c == p // c]
                ref = sum(members) / (len(members) if reduce == "mean" else 1)
                assert abs(float(ours[b, h, t]) - ref) < 1e-9, (b, h, t)


def reference_kept(k, base_scores, T, budget, w, c, reduce, shared):
    """Algorithm 1 with loops: chunks of the prefix ranked by their (head-summed) score, taken whole until the
    budget minus the window is filled (the last chunk cut to its earliest tokens), plus the window."""
    H = k.shape[0]
    P = T - w
    chunks = [list(range(s, min(s + c, P))) for s in range(0, P, c)]
    kept = []
    for h in range(H):
        heads = range(H) if shared else [h]
        agg = []
        for ch in chunks:
            total = sum(float(base_scores[hh][j]) for hh in heads for j in ch)
            agg.append(total / (len(ch) * len(heads)) if reduce == "mean" else total)
        order = sorted(range(len(chunks)), key=lambda i: (-agg[i], i))
        take = [j for i in order for j in chunks[i]][:budget - w]
        kept.append(sorted(take) + list(range(P, T)))
    return kept


@torch.no_grad()
@pytest.mark.parametrize("budget,c,reduce,shared", [(20, 4, "mean", True), (17, 5, "sum", True), (23, 3, "mean", False)])
def test_keeps_the_window_and_the_best_whole_chunks_in_every_layer_and_head(budget, c, reduce, shared):
    model, T, w = tiny_llama(), 50, 6
    cache = KVCache(model, ChunkKV(budget=budget, base=Wave(win=w), chunk_size=c, reduce=reduce, shared_heads=shared))
    log = spy(cache)
    model(ids(T, seed=2), cache=cache)
    for i, layer in enumerate(cache.layers):
        k = log[i][0]["k"][0]  # (H_kv, T, D)
        base = [[torch.sin(torch.tensor(0.7 * j)) * (1.5 + k[h, j, 0]) for j in range(T)] for h in range(k.shape[0])]
        ref = reference_kept(k, base, T, budget, w, c, reduce, shared)
        assert layer.store.kept_slots()[0].tolist() == ref, i


@torch.no_grad()
def test_default_snapkv_base_keeps_the_budget_in_whole_chunks_shared_by_the_heads(tiny):
    cache = kept_counts_equal_budget(tiny, ChunkKV(budget=26, base=SnapKV(window=6), chunk_size=5), 26, T=50)
    for layer in cache.layers:
        kept = layer.store.kept_slots()[0]
        assert torch.equal(kept[0], kept[1])  # one chunk set per layer
        prefix = [j for j in kept[0].tolist() if j < 44]
        assert list(range(44, 50)) == kept[0, -6:].tolist()  # the window
        counts = torch.bincount(torch.tensor(prefix) // 5, minlength=9)
        assert int(((counts > 0) & (counts < 5)).sum()) <= 1  # whole chunks, at most one cut short
        assert int(counts.sum()) == 20


def test_budget_at_least_length_is_identical_to_full(tiny):
    budget_at_least_length_is_full(tiny, ChunkKV(budget=43, base=SnapKV(window=8)), same_bytes=True)


def test_generation_after_eviction_equals_attention_over_kept_tokens_with_original_positions():
    decode_matches_reference(tiny_llama(), ChunkKV(budget=17, base=SnapKV(window=6), chunk_size=4))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    c = left_padded_batch_equals_batch_one(tiny, ChunkKV(ratio=2, base=SnapKV(window=6), chunk_size=4), steps=3)
    held = c.layers[1].store.kept_slots()
    prompt = (held >= 0) & (held < 30)
    assert prompt[0].sum(-1).tolist() == [15, 15] and prompt[1].sum(-1).tolist() == [11, 11]


def test_made_from_its_id_and_a_ratio_with_a_base_by_name():
    m = make_method("chunkkv", 4)
    assert isinstance(m, ChunkKV) and m.ratio == 4 and isinstance(m.base, SnapKV) and m.window == 64
    m = make_method("chunkkv:base=knorm,chunk_size=20", 4)
    assert type(m.base).__name__ == "KNorm" and m.window == 0 and m.chunk_size == 20


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkKV(chunk_size=0)
    with pytest.raises(ValueError, match="reduce"):
        ChunkKV(reduce="max")
    with pytest.raises(ValueError, match="base must be an eviction method"):
        ChunkKV(base=3)
    with pytest.raises(ValueError, match="shared_heads"):
        ChunkKV(shared_heads="yes")
    with pytest.raises(ValueError, match="ratio"):
        ChunkKV.from_ratio(0.5)


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    achieved_ratio_is_on_target(*smollm, ChunkKV)
