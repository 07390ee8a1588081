"""FastGen (arXiv 2310.01801): per-head hybrid policies profiled on the prompt, against plain loops over Eq. (1)-(2)."""

import pytest
import torch

from reference_impls.base import Model

from reference_impls import KVCache
from reference_impls.eviction.fastgen import (POLICIES, FastGen, fastgen_policy, fastgen_profile, fastgen_threshold,
                                              token_classes)
from reference_impls.models import tiny_llama

from evict_checks import (achieved_ratio_is_on_target, budget_at_least_length_is_full, decode_matches_reference, ids,
                          left_padded_batch_equals_batch_one, naive_probs, spy)

SPECIAL, PUNCT = {0, 5, 9, 17}, set(range(20, 40))  # id 0 is also the padding id: padding must never count as special


def loop_profile(A, special, punct, n_loc, n_freq, G):
    """Eq. (1)-(2) with plain loops. A: (H, q, T) list of the prompt's attention, query i at position T - q + i.

    Returns, per KV head, the 5 kept sets after the prompt and the recovered mass of each policy: mean over
    queries of the attention on the kept keys (window: keys less than n_loc positions back), min over the group."""
    H, q, T = len(A), len(A[0]), len(A[0][0])
    sets, recs = [], []
    for hk in range(H // G):
        heads = range(hk * G, (hk + 1) * G)
        freq = [sum(A[h][i][j] for h in heads for i in range(q)) / (G * q) for j in range(T)]
        top = set(sorted(range(T), key=lambda j: -freq[j])[:n_freq])
        base = [special, special | punct, special | punct | top]

        def kept_by(k, i):  # policy k's keys for query i
            if k < 3:
                return base[k]
            return base[2] | {j for j in range(T) if 0 <= (T - q + i) - j < n_loc} if k == 3 else set(range(T))

        rec = [min(sum(sum(A[h][i][j] for j in kept_by(k, i)) for i in range(q)) / q for h in heads) for k in range(4)]
        recs.append(rec + [1.0])
        sets.append(base + [base[2] | set(range(T - n_loc, T)), set(range(T))])
    return sets, recs


def first_recovering(rec, T):
    return next(k for k in range(5) if rec[k] >= T)


def handmade_attention(T=20):
    """Four heads whose answer is known: special-token head, special+punct head, local head, uniform head."""
    A = torch.zeros(4, T, T)
    for i in range(T):
        A[0, i, 0] = 1.0 if i == 0 else 0.97  # almost all on the special token 0
        A[0, i, 1:i + 1] += 0.03 / max(i, 1) if i else 0.0
        p = [j for j in (5, 10, 15) if j <= i]  # punctuation
        A[1, i, 0] = 0.5 if p else 1.0
        for j in p:
            A[1, i, j] = 0.49 / len(p)
        A[1, i, i] += 0.01 if p else 0.0
        A[2, i, max(0, i - 2): i + 1] = 1.0 / (min(i, 2) + 1)  # the last three tokens
        A[3, i, : i + 1] = 1.0 / (i + 1)  # uniform
    return A


@pytest.mark.parametrize("G,expected", [(1, [0, 1, 3, 4]), (2, [1, 4])])
def test_profile_picks_the_known_policies_of_a_handmade_map(G, expected):
    T = 20
    A = handmade_attention(T)
    pos = torch.arange(T)
    special = torch.zeros(1, 4 // G, T, dtype=torch.bool)
    special[..., 0] = True
    punct = torch.zeros_like(special)
    punct[..., [5, 10, 15]] = True
    keep, rec, _ = fastgen_profile(A[None], torch.ones(1, T, dtype=torch.bool), pos[None], pos.expand(1, 4 // G, T),
                                   special, punct, torch.tensor([T]), r_local=0.3, r_frequent=0.3)
    assert fastgen_policy(rec, torch.tensor([0.95]))[0].tolist() == expected  # GQA: the group's hardest head decides
    sets, recs = loop_profile(A.tolist(), {0}, {5, 10, 15}, n_loc=6, n_freq=6, G=G)
    assert [first_recovering(r, 0.95) for r in recs] == expected
    assert torch.allclose(rec[0], torch.tensor(recs), atol=1e-6)
    for hk in range(4 // G):
        assert [set(torch.nonzero(keep[0, hk, k]).flatten().tolist()) for k in range(5)] == sets[hk]


@pytest.mark.parametrize("G,q", [(2, 24), (1, 9), (3, 24)])
def test_profile_equals_the_loop_on_random_attention(G, q):
    """Random causal attention, prompt chunk of q queries over T = 24 keys, random token classes, several T."""
    g = torch.Generator().manual_seed(G * 100 + q)
    H, T = 6, 24
    logits = torch.randn(H, q, T, generator=g) * 2
    causal = torch.arange(T)[None, :] <= torch.arange(T - q, T)[:, None]
    A = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    cls = torch.randint(0, 6, (T,), generator=g)
    special, punct = {j for j in range(T) if cls[j] == 0}, {j for j in range(T) if cls[j] == 1}
    pos = torch.arange(T)
    keep, rec, _ = fastgen_profile(A[None], torch.ones(1, q, dtype=torch.bool), pos[None, T - q:],
                                   pos.expand(1, H // G, T), (cls == 0).expand(1, H // G, T),
                                   (cls == 1).expand(1, H // G, T), torch.tensor([T]), r_local=0.25, r_frequent=0.2)
    sets, recs = loop_profile(A.tolist(), special, punct, n_loc=6, n_freq=5, G=G)
    assert torch.allclose(rec[0], torch.tensor(recs), atol=1e-5)
    for thr in (0.0, 0.5, 0.8, 0.95, 1.0):
        assert fastgen_policy(rec, torch.tensor([thr]))[0].tolist() == [first_recovering(r, thr) for r in recs]
    for hk in range(H // G):
        assert [set(torch.nonzero(keep[0, hk, k]).flatten().tolist()) for k in range(5)] == sets[hk]


def test_profile_ignores_left_padding():
    """A row left-padded by 5 (padding queries attend everywhere, as the integration lets them; padding keys are
    marked special to show they never count) profiles exactly like the row alone."""
    g = torch.Generator().manual_seed(5)
    H, T, pad = 4, 16, 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    A = torch.softmax(torch.randn(H, T, T, generator=g).masked_fill(~causal, float("-inf")), -1)
    P = torch.zeros(H, T + pad, T + pad)
    P[:, pad:, pad:] = A
    P[:, :pad] = 1.0 / (T + pad)
    pos = torch.arange(T)
    ppos = torch.cat([torch.full((pad,), -1), pos])
    cls = torch.randint(0, 4, (T,), generator=g)
    pcls = torch.cat([torch.zeros(pad, dtype=torch.long), cls])
    kw = dict(r_local=0.3, r_frequent=0.3)
    alone = fastgen_profile(A[None], torch.ones(1, T, dtype=torch.bool), pos[None], pos.expand(1, 2, T),
                            (cls == 0).expand(1, 2, T), (cls == 1).expand(1, 2, T), torch.tensor([T]), **kw)
    padded = fastgen_profile(P[None], (ppos >= 0)[None], ppos[None], ppos.expand(1, 2, T + pad),
                             (pcls == 0).expand(1, 2, T + pad), (pcls == 1).expand(1, 2, T + pad), torch.tensor([T]),
                             **kw)
    assert torch.allclose(alone[1], padded[1], atol=1e-6) and torch.allclose(alone[2], padded[2][..., pad:])
    assert torch.equal(alone[0], padded[0][..., pad:]) and not padded[0][..., :pad].any()


def test_threshold_is_the_highest_that_fits_by_brute_force():
    g = torch.Generator().manual_seed(1)
    rec = torch.rand(4, 3, 5, generator=g).sort(-1).values
    rec[..., 4] = 1.0
    cost = (torch.rand(4, 3, 5, generator=g) * 10).round().long().cumsum(-1)
    total = torch.tensor([0, 12, 25, 100])
    got = fastgen_threshold(rec, cost, total)
    for b in range(4):
        fitting = [t for t in sorted(set(rec[b].flatten().tolist()))
                   if sum(cost[b, h, first_recovering(rec[b, h].tolist(), t)] for h in range(3)) <= total[b]]
        assert got[b].item() == (max(fitting) if fitting else -1.0), b


def replay(entry):
    """The attention of a logged prefill step, query by query (naive_probs), as an (H, q, T) list."""
    q, k = entry["q"][0], entry["k"][0]
    T = k.shape[1]
    rows = [naive_probs(q[:, i], k, torch.arange(T)[None].expand(k.shape[0], -1) <= i, entry["scaling"])
            for i in range(q.shape[1])]
    return torch.stack(rows, 1).tolist()


@torch.no_grad()
@pytest.mark.parametrize("recovery", [0.0, 0.3, 0.5, 0.8, 0.97])
def test_paper_mode_keeps_exactly_each_heads_policy(tiny, recovery):
    """recovery=T: every KV head holds exactly the set of the first policy that the loop finds recovering T."""
    T = 40
    x = ids(T, seed=7)
    cache = KVCache(tiny, FastGen(recovery=recovery, special_ids=SPECIAL, punct_ids=PUNCT))
    log = spy(cache)
    tiny(x, cache=cache)
    special = {j for j in range(T) if x[0, j].item() in SPECIAL}
    punct = {j for j in range(T) if x[0, j].item() in PUNCT}
    picked = []
    for entries in log.values():
        sets, recs = loop_profile(replay(entries[0]), special, punct, n_loc=12, n_freq=12, G=2)
        for h, (s, r) in enumerate(zip(sets, recs)):
            k = first_recovering(r, recovery)
            picked.append(k)
            assert {j for j in entries[0]["kept"][0, h].tolist() if j >= 0} == s[k], (h, POLICIES[k])
    assert recovery > 0 or set(picked) == {0}  # T = 0: only the special tokens stay


@torch.no_grad()
def test_budget_mode_layer_total_policy_tokens_and_ratio():
    """Every layer keeps H_kv * b tokens; every head keeps every special token (all policies include C_special),
    and each head keeps its whole policy set under the highest T that fits (found by brute force)."""
    model, T, b = tiny_llama(num_kv_heads=2, num_heads=4, head_dim=64), 60, 18
    x = ids(T, seed=3)
    cache = KVCache(model, FastGen(budget=b, special_ids=SPECIAL, punct_ids=PUNCT))
    log = spy(cache)
    model(x, cache=cache)
    special = {j for j in range(T) if x[0, j].item() in SPECIAL}
    punct = {j for j in range(T) if x[0, j].item() in PUNCT}
    assert special and punct
    policies = []
    for layer, entries in log.items():
        kept = [{j for j in h.tolist() if j >= 0} for h in entries[0]["kept"][0]]
        assert sum(map(len, kept)) == 2 * b
        sets, recs = loop_profile(replay(entries[0]), special, punct, n_loc=18, n_freq=18, G=2)
        fits = [t for t in sorted({v for r in recs for v in r}, reverse=True)
                if sum(len(s[first_recovering(r, t)]) for s, r in zip(sets, recs)) <= 2 * b]
        for h, (s, r) in enumerate(zip(sets, recs)):
            k = first_recovering(r, fits[0]) if fits else 0
            policies.append(k)
            assert special <= kept[h] and (not fits or s[k] <= kept[h]), (layer, h, POLICIES[k])
    assert max(policies) >= 1  # some head went past C_special, so its punctuation is kept too
    full = cache.full_nbytes() / cache.nbytes()
    assert abs(full / (T / b) - 1) < 0.05  # achieved ratio within 5% of the target


@pytest.mark.parametrize("budget", [43, 100])
def test_budget_at_least_length_is_identical_to_full(tiny, budget):
    budget_at_least_length_is_full(tiny, FastGen(budget=budget, special_ids=SPECIAL, punct_ids=PUNCT))


def test_left_padded_batch_gives_the_same_answers_as_batch_one(tiny):
    left_padded_batch_equals_batch_one(tiny, FastGen(ratio=2, special_ids=SPECIAL, punct_ids=PUNCT), steps=2,
                                       ragged=True)


def test_generation_after_eviction_equals_attention_over_each_heads_kept_tokens():
    decode_matches_reference(tiny_llama(), FastGen(budget=14, special_ids=SPECIAL, punct_ids=PUNCT))


class _Tokenizer:
    """The three things token_classes reads from a Hugging Face tokenizer."""

    vocab = ["<pad>", "<s>", ".", " ,", "\n", "hello", "a.", "<tool>", " ?!\n", "\u2014", "", "$", " "]
    all_special_ids = [0, 1]
    added_tokens_decoder = {0: "<pad>", 1: "<s>", 7: "<tool>"}

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, seqs):
        return [self.vocab[s[0]] for s in seqs]


def test_token_classes_come_from_the_caches_tokenizer():
    special, punct = token_classes(_Tokenizer())
    assert special == {0, 1, 7}
    assert punct == {2, 3, 8, 9, 11}  # not "\n", " " (whitespace only), "a." (a letter), "" (empty)
    m = FastGen(ratio=3, r_local=0.2).new_layer(0, Model(tokenizer=_Tokenizer())).method
    assert (m.special_ids, m.punct_ids, m.ratio, m.r_local) == (special, punct, 3, 0.2)


@pytest.mark.slow
def test_smollm_tokenizer_classes(smollm):
    _, tok = smollm
    m = FastGen.from_ratio(2).new_layer(0, Model(tokenizer=tok)).method
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")} <= m.special_ids
    assert {tok(t, add_special_tokens=False).input_ids[0] for t in (".", ",", "?", ":")} <= m.punct_ids
    assert tok("\n", add_special_tokens=False).input_ids[0] not in m.punct_ids


@pytest.mark.slow
def test_achieved_ratio_on_the_embedded_model_is_on_target(smollm):
    model, tok = smollm
    achieved_ratio_is_on_target(model, tok, lambda ratio: FastGen(ratio=ratio), ratios=(1.25, 2, 8))


def test_bad_parameters_and_missing_token_ids_are_rejected(tiny):
    for kwargs, match in [(dict(r_local=1.5), "r_local"), (dict(r_frequent=-0.1), "r_frequent"),
                          (dict(recovery=1.2), "recovery"), (dict(recovery=0.9, budget=10), "recovery"),
                          (dict(special_ids={-1}), "special_ids"), (dict(punct_ids={"."}), "punct_ids"),
                          (dict(budget=0), "budget")]:
        with pytest.raises(ValueError, match=match):
            FastGen(**kwargs)
    with pytest.raises(ValueError, match="ratio"):
        FastGen.from_ratio(0.5)
    emb = tiny.get_input_embeddings()(ids(30))
    with pytest.raises(ValueError, match="token ids"), torch.no_grad():
        tiny(inputs_embeds=emb, cache=KVCache(tiny, FastGen(budget=8, special_ids={5})))
    with torch.no_grad():  # without token classes no ids are needed
        tiny(inputs_embeds=emb, cache=KVCache(tiny, FastGen(budget=8)))


def test_a_recorded_prefill_shares_the_attention_between_ratios_and_matches_live_runs():
    from reference_impls.replay import cache_from_record, record_prefill

    model = tiny_llama()
    x = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(7))
    rec = record_prefill(model, x)
    for budget in (10, 20, 30):
        live = KVCache(model, FastGen(budget=budget))
        model(x, cache=live)
        replay = cache_from_record(model, FastGen(budget=budget), rec)
        for a, b in zip(live.layers, replay.layers):
            assert torch.equal(a.store.kept_slots(), b.store.kept_slots())
    assert len(rec.probs) == model.config.num_hidden_layers  # the prompt's attention computed once per layer
