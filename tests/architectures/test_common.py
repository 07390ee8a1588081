"""The shared contract: ArchConfig validation, build() names, RoPE, MixerCache, TinyLM."""

import importlib

import pytest
import torch

from reference_impls.architectures.common import ARCHS, ArchConfig, MixerCache, TinyLM, build, rope


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_build_every_name_or_say_which_module_is_missing(arch):
    cfg = ArchConfig(n_kv_heads=2)
    try:
        importlib.import_module(f"reference_impls.architectures.{ARCHS[arch]}")
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match=f"architecture '{arch}'.*not there yet"):
            build(arch, cfg)
        return
    lm = build(arch, cfg)
    assert isinstance(lm, TinyLM) and len(lm.mixers) == cfg.n_layers
    assert lm(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, cfg.vocab)


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="arch must be one of"):
        build("transformer", ArchConfig())


@pytest.mark.parametrize("field,value,match", [
    ("vocab", 0, "vocab must be a positive int"), ("d_model", 2.0, "d_model must be a positive int"),
    ("n_layers", -1, "n_layers"), ("window", 0, "window"), ("d_ff", True, "d_ff"),
    ("head_dim", 7, "head_dim must be even"), ("n_kv_heads", 3, "n_kv_heads must divide"),
    ("n_kv_heads", 8, "n_kv_heads must divide"), ("rope_base", 1.0, "rope_base must be > 1")])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ArchConfig(**{field: value})


def test_tinylm_needs_one_mixer_per_layer():
    with pytest.raises(ValueError, match="n_layers=4"):
        TinyLM(ArchConfig(), [])


def test_rope_scores_depend_only_on_the_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    score = lambda m, n: (rope(q, torch.tensor([m]), 1e4) * rope(k, torch.tensor([n]), 1e4)).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(rope(q, torch.tensor([0]), 1e4), q)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_cache_append_keeps_the_last_entries_and_counts_bytes():
    c = MixerCache()
    full = c.append("k", torch.arange(6.).view(1, 1, 3, 2), keep=4)
    assert full.shape[2] == 3 and c.nbytes() == 3 * 2 * 4
    full = c.append("k", torch.arange(6., 10.).view(1, 1, 2, 2), keep=4)
    assert full.shape[2] == 5 and c.held["k"].shape[2] == 4 and c.nbytes() == 4 * 2 * 4
    assert torch.equal(c.held["k"], full[:, :, 1:])
