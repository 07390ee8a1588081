"""InfLLM (arXiv 2402.04617): representative keys from local attention, block lookup, the keys read and the bytes
read, against plain loops over the attention the model really computed."""

import pytest
import torch

from reference_impls import KVCache
from reference_impls.retrieval.infllm import InfLLM, infllm_block_scores, infllm_representatives

from retrieval_checks import (budget_covering_length_is_full, decode_reads_exactly_the_selection, ids, kv_bytes_of,
                              left_padded_batch_equals_batch_one, read_shrinks_with_the_budget, spy_select)


def test_representatives_are_the_mean_of_each_heads_most_attended_keys():
    g = torch.Generator().manual_seed(0)
    k, score = torch.randn(2, 3, 6, 4, generator=g), torch.rand(4, 3, 6, generator=g)  # H_kv=2, H=4, 3 blocks of 6
    ours = infllm_representatives(k, score, 2)
    for h in range(4):
        for n in range(3):
            best = sorted(range(6), key=lambda t: -float(score[h, n, t]))[:2]
            assert torch.allclose(ours[h, n], (k[h // 2, n, best[0]] + k[h // 2, n, best[1]]) / 2, atol=1e-6)
    q, reps = torch.randn(1, 4, 4, generator=g), ours[None]
    rel = infllm_block_scores(q, reps)
    assert torch.allclose(rel[0], torch.stack([sum(q[0, h] @ reps[0, h, n] for h in range(4)) for n in range(3)]))


def attention_rows(e):
    """The attention weights the step computed, recomputed plainly: (H, q, T) softmax over what each query read."""
    q, k, pos, s = e["q"][0], e["k"][0], e["pos"][0, 0], e["scaling"]
    H, nq, _ = q.shape
    qpos = pos[-nq:]
    out = torch.zeros(H, nq, k.shape[1])
    for h in range(H):
        for i in range(nq):
            see = pos <= qpos[i]
            if e["sel"] is not None:
                see = see & e["sel"][0, h // (H // k.shape[0]), 0]
            out[h, i, see] = torch.softmax((k[h // 2, see] @ q[h, i]) * s, 0)
    return out, qpos, pos


@torch.no_grad()
def test_blocks_representatives_and_reads_equal_a_reference_built_from_the_attention_computed(tiny):
    n_init, n_local, topk, bs, r = 2, 8, 2, 4, 2
    cache = KVCache(tiny, InfLLM(n_init=n_init, n_local=n_local, topk=topk, block_size=bs, repr_topk=r))
    log = spy_select(cache)
    tiny(ids(30, seed=1), cache=cache)
    for t in range(6):
        tiny(torch.tensor([[5 + t]]), cache=cache)
    for layer in range(2):
        store, entries = cache.layers[layer].store, log[layer]
        k = store.k[0]  # (H_kv, T, D)
        T = k.shape[1]
        local = torch.zeros(4, T)  # the attention each token got from queries holding it in their local window
        for e in entries:
            w, qpos, pos = attention_rows(e)
            for i in range(len(qpos)):
                for j in range(len(pos)):
                    if 0 <= qpos[i] - pos[j] < n_local:
                        local[:, j] += w[:, i, j]
        formed = (T - n_local - n_init) // bs
        assert int(store.n_blocks[0]) == formed
        for b in range(formed):  # each block: per query head, the mean of its r keys with the highest local score
            toks = range(n_init + b * bs, n_init + (b + 1) * bs)
            for h in range(4):
                best = sorted(toks, key=lambda t: -float(local[h, t]))[:r]
                assert torch.allclose(store.reps[0, h, b], k[h // 2, best].mean(0), atol=1e-5), (layer, b, h)
        for e in entries[1:]:  # each decoding step: sinks, window and unfilled tail + the top-2 blocks by q . reps
            n = e["k"].shape[2]
            nb = max((n - 1 - n_local - n_init) // bs, 0)  # blocks formed before this step
            q = e["q"][0, :, -1]
            rel = [sum(float(q[h] @ store.reps[0, h, b]) for h in range(4)) for b in range(nb)]
            top = sorted(range(nb), key=lambda b: -rel[b])[:topk]
            expect = torch.tensor([t < n_init or t >= n_init + nb * bs or (t - n_init) // bs in top for t in range(n)])
            assert torch.equal(e["sel"][0, 0, 0], expect) and torch.equal(e["sel"][0, 1, 0], expect), (layer, n)
            assert e["read"] == kv_bytes_of(e["sel"][0, :, 0], e["k"], e["v"]) + 4 * nb * 16 * 4  # + H x N x D fp32


def test_decoding_reads_exactly_the_selected_blocks(tiny):
    decode_reads_exactly_the_selection(tiny, InfLLM(n_init=2, n_local=8, topk=2, block_size=4, repr_topk=2))


def test_a_budget_covering_every_token_is_the_full_cache(tiny):
    budget_covering_length_is_full(tiny, InfLLM(budget=100, block_size=4, repr_topk=2))


def test_left_padded_batch_equals_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, InfLLM(n_init=2, n_local=8, topk=2, block_size=4, repr_topk=2))


def test_bytes_read_shrink_with_the_budget(tiny):
    read_shrinks_with_the_budget(tiny, lambda r: InfLLM(ratio=r, block_size=4, repr_topk=2))


def test_sizes_follow_the_paper_configs_or_the_seeds_split_of_the_read_budget():
    n = torch.tensor([7500])
    assert [int(t) for t in InfLLM().sizes(n)] == [128, 4096, 16]  # official configs
    b = round(7500 / 4)  # seed: n_init = int(2.1% b), topk = int(32.4% b) // 128 blocks, the rest local
    init, topk = int(b * 0.021), int(b * 0.324) // 128
    assert [int(t) for t in InfLLM.from_ratio(4).sizes(n)] == [init, b - init - topk * 128, topk] == [39, 1324, 4]
    assert [int(t) for t in InfLLM.from_ratio(4, topk=1).sizes(n)] == [39, 1324, 1]  # a fixed knob wins


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="n_local must be an int >= 1"):
        InfLLM(n_local=0)
    with pytest.raises(ValueError, match=r"repr_topk must be an int in \[1, block_size\]"):
        InfLLM(block_size=4, repr_topk=5)
    with pytest.raises(ValueError, match="init_share and retrieved_share must be >= 0 with a sum <= 1"):
        InfLLM(init_share=0.5, retrieved_share=0.6)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        InfLLM(block_size=0)
