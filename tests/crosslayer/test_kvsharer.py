"""KVSharer (arXiv 2410.18517): distances, ranking, greedy search and sharing, against brute-force references."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from reference_impls import Full, KVCache, make_method
from reference_impls.base import Model, Step
from reference_impls.crosslayer.kvsharer import KVSharer, kvsharer_distances, kvsharer_ranking, kvsharer_search
from reference_impls.generation import greedy_generate
from reference_impls.integration import ATTN_NAME, model_info
from reference_impls.models import tiny_llama
from reference_impls.replay import cache_from_record, record_prefill


def ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def random_steps(L=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Step.dense(torch.randn(1, 4, T, 8, generator=g), torch.randn(1, 2, T, 8, generator=g),
                       torch.randn(1, 2, T, 8, generator=g), layer_idx=i) for i in range(L)]


def brute_distance(a, b):
    """The official notebook's distance with loops: mean over (batch, head, token) of the L2 norm of the difference."""
    B, H, T, D = a.shape
    return sum(math.sqrt(sum((float(a[x, h, t, d]) - float(b[x, h, t, d])) ** 2 for d in range(D)))
               for x in range(B) for h in range(H) for t in range(T)) / (B * H * T)


def brute_owner(ranking, n_share, L):
    """Accept every pair in ranking order unless its later layer already shares; follow chains to their end."""
    owner = list(range(L))
    for i, j in ranking:
        if sum(o != n for n, o in enumerate(owner)) >= n_share:
            break
        if owner[i] == i:
            owner[i] = j
            for n in range(L):  # a layer reading i's cache (or j's, shared) reads the end of the chain
                while owner[owner[n]] != owner[n]:
                    owner[n] = owner[owner[n]]
    return owner


def loop_attention_output(step, k, v, w_o):
    """Per head and query: softmax over the causal prefix of q.k * scale, times the values; heads concatenated, W_o."""
    _, H, T, D = step.queries.shape
    G = H // k.shape[1]
    out = torch.zeros(T, H * D)
    for h in range(H):
        for t in range(T):
            w = torch.softmax(torch.stack([step.queries[0, h, t] @ k[0, h // G, s] * step.scaling
                                           for s in range(t + 1)]), 0)
            out[t, h * D:(h + 1) * D] = sum(w[s] * v[0, h // G, s] for s in range(t + 1))
    return out @ w_o.T


def test_distances_and_ranking_equal_brute_force():
    steps = random_steps()
    dist = kvsharer_distances([s.keys for s in steps], [s.values for s in steps])
    for i in range(5):
        for j in range(5):
            ref = (brute_distance(steps[i].keys, steps[j].keys) + brute_distance(steps[i].values, steps[j].values)) / 2
            assert math.isclose(float(dist[i, j]), ref, rel_tol=1e-5, abs_tol=1e-6)
    ref_rank = sorted(((i, j) for i in range(5) for j in range(i)), key=lambda p: -float(dist[p]))
    assert kvsharer_ranking(dist) == ref_rank  # most dissimilar first


@pytest.mark.parametrize("n_share", [0, 1, 2, 4])
def test_search_walks_the_ranking_and_resolves_chains(n_share):
    steps = random_steps(seed=n_share)
    plan = kvsharer_search(steps, n_share, threshold=-1.0)  # every plan passes (cosine > -1)
    rank = kvsharer_ranking(plan["distances"])
    assert plan["owner"] == brute_owner(rank, n_share, 5)
    assert sum(o != n for n, o in enumerate(plan["owner"])) == n_share
    assert all(plan["owner"][o] == o for o in plan["owner"])  # an owner owns its cache
    nothing = kvsharer_search(steps, n_share, threshold=1.0)  # no plan beats cosine 1
    assert nothing["owner"] == list(range(5)) and not any(a for *_, a in nothing["tried"])


def test_the_acceptance_proxy_is_the_similarity_of_the_summed_attention_outputs():
    steps = random_steps(L=3, T=6, seed=7)
    w_o = [torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plan = kvsharer_search(steps, 1, threshold=-1.0, w_o=w_o)
    i, j, sim, accepted = plan["tried"][0]
    own = [loop_attention_output(s, s.keys, s.values, w) for s, w in zip(steps, w_o)]
    shared = list(own)
    shared[i] = loop_attention_output(steps[i], steps[j].keys, steps[j].values, w_o[i])
    ref = F.cosine_similarity(sum(own).flatten(), sum(shared).flatten(), dim=0)
    assert accepted and math.isclose(sim, float(ref), rel_tol=1e-4)


_OWNER, _SEEN = {}, {}


def _shared_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain causal SDPA where layer i attends with the keys/values layer _OWNER[i] computed in this forward."""
    _SEEN[module.layer_idx] = (k, v)
    k, v = _SEEN[_OWNER[module.layer_idx]]
    G = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def shared_forward_logits(model, seq, owner):
    AttentionInterface.register("share_ref", _shared_attention)
    AttentionMaskInterface.register("share_ref", sdpa_mask)
    _OWNER.clear()
    _OWNER.update(enumerate(owner))
    model.set_attn_implementation("share_ref")
    try:
        return model(seq).logits[:, -1]
    finally:
        model.set_attn_implementation(ATTN_NAME)


@torch.no_grad()
def test_shared_layers_hold_nothing_and_decode_like_a_forward_that_shares():
    model, x = tiny_llama(num_layers=4), ids(30)
    method = KVSharer(ratio=2, threshold=-1.0)  # share round(4 (1 - 1/2)) = 2 layers, every plan accepted
    cache = KVCache(model, method)
    owner = method.plan(cache.model_info)["owner"]
    assert sum(o != n for n, o in enumerate(owner)) == 2
    logits, seq = model(x, cache=cache).logits[:, -1], x
    assert torch.allclose(logits, shared_forward_logits(model, seq, owner), atol=1e-5)
    for _ in range(3):
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        logits = model(tok, cache=cache).logits[:, -1]
        assert torch.allclose(logits, shared_forward_logits(model, seq, owner), atol=1e-5)
    for n, o in enumerate(owner):
        store = cache.layers[n].store
        assert store.nbytes() == (0 if o != n else 2 * 2 * 33 * 16 * 4)  # K, V x 2 heads x 33 tokens x D x fp32
    assert cache.nbytes() * 2 == cache.full_nbytes()


@torch.no_grad()
def test_sharing_no_layer_is_exactly_full():
    model, x = tiny_llama(num_layers=4), ids(40)
    for method in (KVSharer(ratio=1.0), KVSharer(ratio=2, threshold=1.0)):  # none to share; no plan passes
        full, ours = KVCache(model, Full()), KVCache(model, method)
        assert torch.equal(model(x, cache=full).logits, model(x, cache=ours).logits)
        for t in (9, 10):
            nxt = torch.tensor([[t]])
            assert torch.equal(model(nxt, cache=full).logits, model(nxt, cache=ours).logits)
        assert ours.nbytes() == full.nbytes()


@torch.no_grad()
def test_a_replay_equals_live_when_the_prompt_attends_with_its_own_states():
    model, x = tiny_llama(num_layers=4), ids(50, seed=2)
    rec = record_prefill(model, x)
    for share_prefill in (True, False):
        method = KVSharer(ratio=2, threshold=-1.0, share_prefill=share_prefill)
        live = KVCache(model, method)
        prompt = model(x, cache=live).logits[:, -1:]
        assert torch.allclose(prompt, rec.logits, atol=1e-5) != share_prefill  # the paper shares the prompt too
        replayed = cache_from_record(model, method, rec)
        assert live.nbytes() == replayed.nbytes() == live.full_nbytes() // 2
        a = model(torch.tensor([[7]]), cache=live).logits
        b = model(torch.tensor([[7]]), cache=replayed).logits
        assert torch.allclose(a, b, atol=1e-5) != share_prefill


@torch.no_grad()
def test_similar_first_walks_the_reversed_ranking():
    model = tiny_llama(num_layers=4)
    info = model_info(model)
    steps = info.calibration("stdlib", 512)
    rank = kvsharer_ranking(kvsharer_distances([s.keys for s in steps], [s.values for s in steps]))
    for order, walk in (("dissimilar", rank), ("similar", rank[::-1])):
        plan = KVSharer(ratio=2, threshold=-1.0, order=order).plan(info)
        assert plan["owner"] == brute_owner(walk, 2, 4) and [t[:2] for t in plan["tried"]][0] == walk[0]


@torch.no_grad()
def test_generation_runs_from_a_ratio():
    model, x = tiny_llama(num_layers=4), ids(40, seed=1)
    method = make_method("kvsharer:threshold=-1", 4)  # share round(4 (1 - 1/4)) = 3 layers: all but layer 0
    assert method == KVSharer(ratio=4, threshold=-1)
    gen = greedy_generate(model, KVCache(model, method), [x], 4)
    assert len(gen.tokens) == 4 and gen.kv_bytes * 4 == greedy_generate(model, KVCache(model, Full()), [x], 4).kv_bytes


@pytest.mark.parametrize("knobs,match", [(dict(ratio=0.5), "ratio must be a number >= 1"),
                                         (dict(threshold=2), "threshold must be a number in"),
                                         (dict(calibration_tokens=4), "calibration_tokens must be an int >= 8"),
                                         (dict(order="random"), "order must be 'dissimilar' or 'similar'")])
def test_bad_knobs_name_the_parameter(knobs, match):
    with pytest.raises(ValueError, match=match):
        KVSharer(**knobs)


def test_a_model_without_calibration_is_refused():
    with pytest.raises(ValueError, match="KVSharer needs calibration prefills"):
        KVSharer(ratio=2).new_layer(0, Model(num_layers=4))
    assert model_info(tiny_llama()).calibration is not None


def test_sharing_during_the_prompt_is_not_replayable():
    """The benchmark replays one uncompressed prefill for every method unless a method says it cannot be replayed."""
    from reference_impls import Full
    from reference_impls.crosslayer import KVSharer

    assert not KVSharer().replayable and KVSharer(share_prefill=False).replayable and Full().replayable
