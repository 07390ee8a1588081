"""The retrieval family's shared pieces (`retrieval/base.py`, which has no test file of its own so that a change to
it runs this whole folder): per-head top-k with forced keys and per-row budgets, read budgets, and a replayed
prefill reading what a live one reads."""

import torch

from reference_impls import KVCache
from reference_impls.generation import greedy_generate
from reference_impls.replay import cache_from_record, record_prefill
from reference_impls.retrieval import InfLLM, Loki, Quest, SparQ
from reference_impls.retrieval.base import top_k_mask

from retrieval_checks import ids


def test_top_k_mask_keeps_forced_keys_never_reads_a_forbidden_one_and_budgets_each_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 10, generator=g)
    scores[1, :, 7:] = float("-inf")  # row 1 may not read its last 3 keys
    forced = torch.zeros(2, 3, 10, dtype=torch.bool)
    forced[:, :, 0] = True  # the lowest-scored key might be forced: it is read anyway
    k = torch.tensor([4, 9])
    mask = top_k_mask(scores, k, forced)
    assert mask[0].sum(-1).tolist() == [4, 4, 4] and mask[1].sum(-1).tolist() == [7, 7, 7]  # 9 asked, 7 allowed
    assert mask[:, :, 0].all() and not mask[1, :, 7:].any()
    for b, h in ((0, 0), (0, 2)):  # the others: the best 3 of the unforced keys
        best = set((scores[b, h, 1:].topk(3).indices + 1).tolist())
        assert set(mask[b, h].nonzero().flatten().tolist()) == best | {0}


def test_read_budget_is_the_ratio_of_each_rows_tokens_or_a_fixed_budget():
    n = torch.tensor([100, 7, 1])
    assert SparQ(ratio=8).read_budget(n).tolist() == [12, 1, 1]  # round(n / 8), at least one
    assert SparQ(budget=5).read_budget(n).tolist() == [5, 5, 5]
    assert Loki().read_budget(n).tolist() == [25, 2, 1]  # the paper's default ratio 4


@torch.no_grad()
def test_a_replayed_prefill_decodes_like_a_live_one(tiny):
    x = ids(50, seed=3)
    rec = record_prefill(tiny, x)
    for method in (Quest(budget=12, page_size=4, dense_layers=1), SparQ(budget=10), Loki(budget=10),
                   InfLLM(n_init=2, n_local=8, topk=2, block_size=4, repr_topk=2)):
        live = greedy_generate(tiny, KVCache(tiny, method), [x], 5)
        replayed = greedy_generate(tiny, cache_from_record(tiny, method, rec), [], 5, logits=rec.logits)
        assert live.tokens == replayed.tokens and live.read_kv_bytes == replayed.read_kv_bytes, type(method).__name__
        assert live.read_kv_bytes < live.kv_bytes_end
