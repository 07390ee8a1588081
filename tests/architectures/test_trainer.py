"""The trainer (reference_impls/architectures/trainer.py) and `kvatlas arch-bench`: the schedule, the shared
parameter budget, a few steps lower the loss, the cache folder is reused (nothing retrains), cache bytes are
measured from held tensors (MHA's against its closed form), and the command's errors name the parameter."""

import dataclasses
import json

import pytest
import torch

from reference_impls.architectures import suite, trainer
from reference_impls.architectures.common import ArchConfig, build
from reference_impls.architectures.trainer import TrainConfig
from reference_impls.cli import main

SMALL = ArchConfig(d_model=32, n_layers=2, n_heads=2, head_dim=16, n_kv_heads=2, d_ff=64)
FAST = TrainConfig(steps=6, batch=6, length=48, lr=1e-2, warmup=0.3, min_lr=1e-3, eval_n=3)


def test_schedule_warms_up_then_decays_to_min_lr():
    tc = TrainConfig(steps=100, warmup=0.1, lr=1e-2, min_lr=1e-3)
    s = [trainer.lr_scale(i, tc) for i in range(100)]
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(s[9:], s[10:]))  # never rises after the warmup
    assert s[-1] == pytest.approx(0.1) and s[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)


@pytest.mark.parametrize("arch", trainer.ARCHS)
def test_every_architecture_gets_the_same_budget(arch):
    budget = trainer.param_count(build("mha", trainer.arch_config("mha")))
    cfg, params = trainer.match_budget(arch, trainer.arch_config(arch), budget)
    assert params == sum(p.numel() for p in build(arch, cfg).parameters())
    assert abs(params - budget) <= trainer.TOLERANCE * budget
    # no other d_ff comes closer
    near = [sum(p.numel() for p in build(arch, dataclasses.replace(cfg, d_ff=d)).parameters())
            for d in (cfg.d_ff - 1, cfg.d_ff + 1)]
    assert all(abs(n - budget) >= abs(params - budget) for n in near)


def test_arch_config_names_the_kv_heads():
    assert [trainer.arch_config(a).n_kv_heads for a in ("mha", "mqa", "gqa")] == [4, 1, 2]


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build("mha", SMALL)
    ids, targets, mask = suite.mixed_batch(12, 48, torch.Generator().manual_seed(99))
    loss = lambda: torch.nn.functional.cross_entropy(model(ids)[mask], targets[mask]).item()
    before = loss()
    curve = trainer.train(model, dataclasses.replace(FAST, steps=12))
    assert len(curve) == 12 and loss() < before - 0.3


def test_the_cache_folder_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVATLAS_CACHE", str(tmp_path))
    model, meta = trainer.trained("mha", FAST, SMALL)
    assert not meta["cached"] and meta["folder"].startswith(str(tmp_path / "architectures"))
    assert sorted(p.name for p in (tmp_path / "architectures").iterdir()) == [meta["folder"].rsplit("/", 1)[1]]

    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(trainer, "train", no_training)
    again, meta2 = trainer.trained("mha", FAST, SMALL)
    assert meta2["cached"] and meta2["folder"] == meta["folder"] and meta2["curve"] == pytest.approx(meta["curve"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.undo()
    monkeypatch.setenv("KVATLAS_CACHE", str(tmp_path))
    _, meta3 = trainer.trained("mha", dataclasses.replace(FAST, seed=1), SMALL)  # another seed: another run
    assert not meta3["cached"] and meta3["folder"] != meta["folder"]


def test_mha_cache_bytes_are_measured_and_match_its_closed_form():
    torch.manual_seed(0)
    model = build("mha", SMALL)
    m = trainer.measure_cache(model, 40)
    per_token = 2 * SMALL.n_layers * SMALL.n_kv_heads * SMALL.head_dim * 2  # K and V, every layer, bf16
    assert m["bytes"] == 40 * per_token and m["marginal_bytes_per_token"] == per_token
    assert m["step_vs_forward"] < 1e-4


def test_a_bench_row(tmp_path, monkeypatch):
    monkeypatch.setenv("KVATLAS_CACHE", str(tmp_path))
    for arch in ("mha", "mamba"):  # a cache that grows, a constant state
        row = trainer.bench_row(arch, FAST, SMALL)
        assert row["lengths"] == [24, 48, 96, 192] and set(row["accuracy"]) == {"recall", "copy", "passkey"}
        assert all(0 <= a <= 1 for per in row["accuracy"].values() for a in per.values())
        assert row["params"] == trainer.param_count(build(arch, ArchConfig(**row["config"])))
        assert row["constant_state"] == (arch != "mha") and json.dumps(row)
        if arch == "mha":
            assert row["bytes_per_token"]["96"] == row["marginal_bytes_per_token"]["96"] > 0
        else:
            assert len(set(row["cache_bytes"].values())) == 1 and row["state_bytes"] == row["cache_bytes"]["24"]


@pytest.mark.parametrize("argv, message", [
    (["--archs", "mha,transformerxl"], "--archs 'mha,transformerxl': unknown transformerxl; allowed: mha, mqa"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--threads", "0"], "--threads 0 must be >= 1"),
    (["--length", "30"], "--length 30: length=30 must be >= 32"),
])
def test_arch_bench_errors_name_the_parameter(argv, message, capsys, tmp_path):
    # cheap settings first (the flag under test comes later and wins): a check that let bad input through would
    # train one tiny step, not the default run
    cheap = ["--archs", "mha", "--steps", "1", "--length", "48", "--eval-n", "1"]
    assert main(["arch-bench", *cheap, *argv, "--output", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvatlas arch-bench: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()


def test_arch_bench_writes_one_line_per_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVATLAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "res" / "bench.jsonl"
    out.parent.mkdir()
    out.write_text(json.dumps({"arch": "mqa", "kept": True}) + "\n")  # another architecture's line is kept
    argv = ["arch-bench", "--archs", "mha", "--steps", "3", "--length", "48", "--eval-n", "2", "--threads", "1",
            "--output", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arch"] for r in rows] == ["mqa", "mha"] and rows[0]["kept"]
    mha = rows[1]
    assert mha["threads"] == 1 and mha["train"]["steps"] == 3 and mha["commit"]
    assert mha["command"] == "kvatlas arch-bench " + " ".join(argv[1:])
    assert main(argv) == 0  # again: loaded from the cache, the line replaced
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["cached"] and rows[1]["accuracy"] == mha["accuracy"]
