"""`kvatlas bench`: the grid, resume, shards, the 16-bit unit, and one checked-in cell re-run and compared."""

import json
from pathlib import Path

import pytest

from reference_impls.bench.command import parse_shard, split_methods, UsageError
from reference_impls.bench.run import Cell, plan, read_rows
from reference_impls.cli import main

ROOT = Path(__file__).resolve().parents[1]


class _Task:
    def __init__(self, name, lengths=(1500,)):
        self.name, self.lengths = name, lengths


def test_split_methods_keeps_knobs_with_their_method():
    assert split_methods("snapkv:window=32,kernel_size=7+kivi:bits=4,h2o, tova") == [
        "snapkv:window=32,kernel_size=7+kivi:bits=4", "h2o", "tova"]
    assert split_methods("full") == ["full"]


def test_parse_shard():
    assert parse_shard(None) == (0, 1) and parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)


def test_plan_puts_the_full_cache_first_once_per_group():
    cells = plan(["snapkv", "full", "kivi"], [2, 4], {"a": _Task("a", (1000, 2000)), "b": _Task("b")},
                 ["query-aware", "query-agnostic"])
    groups = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    assert len(groups) == 6 and all(len(g) == 5 for g in groups.values())
    for g in groups.values():
        assert g[0] == Cell("full", 1.0, *g[0].group) and sum(c.method == "full" for c in g) == 1
    assert len({c.key for c in cells}) == len(cells)


def test_plan_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: query-aware, query-agnostic"):
        plan(["snapkv"], [2], {"a": _Task("a")}, ["both"])
    with pytest.raises(ValueError, match=">= 1"):
        plan(["snapkv"], [0.5], {"a": _Task("a")}, ["query-aware"])
    with pytest.raises(ValueError, match="empty"):
        plan([], [2], {"a": _Task("a")}, ["query-aware"])


def test_read_rows_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3"):
        read_rows(p)
    assert read_rows(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("args,match", [
    (["--methods", "nope"], "unknown method 'nope'; implemented methods: adakv"),
    (["--methods", "snapkv:windw=3"], "windw"),
    (["--ratios", "2,x"], "--ratios"),
    (["--tasks", "nosuchtask"], "nosuchtask"),
    (["--settings", "sideways"], "sideways"),
    (["--shard", "3/2"], "--shard"),
])
def test_bench_usage_errors_exit_2_before_loading_a_model(args, match, capsys, tmp_path):
    assert main(["bench", *args, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _bench(tmp_path, *extra):
    out = tmp_path / "b.jsonl"
    argv = ["bench", "--methods", "streamingllm,kivi:bits=4,streamingllm+kivi:bits=4", "--ratios", "4",
            "--tasks", "passkey", "--lengths", "400", "--n", "2", "--repeats", "1", "--threads", "1", "--output", str(out),
            *extra]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_bench_rows_units_resume_and_timing(tmp_path):
    out = _bench(tmp_path)
    rows = read_rows(out)
    side = out.with_name("b.samples.jsonl")
    assert [r["method"] for r in rows] == ["full", "streamingllm", "kivi:bits=4", "streamingllm+kivi:bits=4"]
    assert len(side.read_text().splitlines()) == 4 * 2
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["n"] == 2 and 0 <= r["score"] <= 1 and r["task"] == "passkey"
        assert r["timing"].startswith("timing pass: alone, median of 1")
        assert r["full_kv_bytes"] > 0 and r["peak_kv_bytes"] >= r["kv_bytes"] and r["decode_tokens_per_s"] > 0
        assert r["commit"] and r["command"].startswith("kvatlas bench --methods")
    # ratios against a 16-bit cache: the bf16 full cache is 1x, StreamingLLM at 4x keeps a quarter of the tokens,
    # KIVI-4 is ~2.3x at 400 tokens (its 128-token window weighs more on short prompts), the composition ~ product
    assert by["full"]["achieved_ratio"] == 1.0 and by["full"]["full_score"] is None
    assert by["streamingllm"]["achieved_ratio"] == pytest.approx(4, rel=0.05)
    assert 1.8 < by["kivi:bits=4"]["achieved_ratio"] < 3.2
    # the composition: KIVI fixed at 4 bits, StreamingLLM asked for what is left of 4x; evicting shrinks it further
    assert by["kivi:bits=4"]["achieved_ratio"] < by["streamingllm+kivi:bits=4"]["achieved_ratio"] < 4.2
    assert by["streamingllm"]["full_score"] == by["full"]["score"]
    assert by["full"]["kv_bytes"] == by["full"]["full_kv_bytes"]  # bf16 holds exactly the 16-bit unit
    # the same command again: nothing is redone
    before = (out.read_text(), side.read_text())
    _bench(tmp_path, "--no-timing")
    assert (out.read_text(), side.read_text()) == before


@pytest.mark.slow
def test_a_shard_runs_its_cells_and_the_full_cache(tmp_path):
    _bench(tmp_path, "--shard", "1/2", "--no-timing")
    rows = read_rows(tmp_path / "b.shard1of2.jsonl")
    assert [r["method"] for r in rows] == ["full", "kivi:bits=4"]
    assert rows[1]["timing"] == "accuracy pass (shared cores)"


@pytest.mark.slow
def test_one_checked_in_cell_reproduces(tmp_path):
    """Re-run one cell of the checked-in grid with its own command's settings and compare bytes and answers."""
    grid = ROOT / "results" / "bench" / "grid.jsonl"
    rows = [r for r in read_rows(grid) if r["method"] == "snapkv" and r["target_ratio"] == 4 and r["task"] == "passkey"
            and r["setting"] == "query-aware"]
    assert rows, f"{grid} has no snapkv 4x passkey row"
    cell = rows[0]
    assert cell["dtype"] == "bfloat16" and cell["threads"] == 1  # what the command below repeats
    out = tmp_path / "again.jsonl"
    # the same n: a task's prompts depend on n (passkey depths are spread over the n prompts)
    argv = ["bench", "--methods", "snapkv", "--ratios", "4", "--tasks", cell["task"], "--lengths", str(cell["length"]),
            "--n", str(cell["n"]), "--no-timing", "--threads", "1", "--output", str(out)]
    assert main(argv) == 0
    mine = {r["cell"]: r for r in read_rows(out)}[cell["cell"]]
    theirs = [json.loads(l) for l in grid.with_name("grid.samples.jsonl").read_text().splitlines()]
    theirs = {r["sample"]: r for r in theirs if r["cell"] == cell["cell"]}
    again = {r["sample"]: r for r in map(json.loads, out.with_name("again.samples.jsonl").read_text().splitlines())
             if r["cell"] == cell["cell"]}
    assert sorted(again) == sorted(theirs) == list(range(cell["n"]))
    for i in again:
        assert again[i]["kv_bytes"] == theirs[i]["kv_bytes"] and again[i]["full_kv_bytes"] == theirs[i]["full_kv_bytes"]
        assert again[i]["answer"] == theirs[i]["answer"] and again[i]["score"] == theirs[i]["score"]
    assert mine["score"] == cell["score"] and mine["achieved_ratio"] == cell["achieved_ratio"]


@pytest.mark.slow
def test_a_method_that_cannot_be_replayed_is_prefilled_live(smollm):
    """KVSharer shares layers during the prompt: the benchmark must not build its cache from the uncompressed
    record; its answer and bytes equal a live `generation.run_sample`."""
    import torch

    from reference_impls.bench.run import run_sample
    from reference_impls.crosslayer import KVSharer
    from reference_impls.data import passkey_samples
    from reference_impls.generation import build_prompt, eos_ids, run_sample as live
    from reference_impls.replay import record_prefill

    model, tok = smollm
    s = passkey_samples(1, 300, seed=0, tokenizer=tok)[0]
    ctx, qst = build_prompt(tok, s["context"], s["question"], s["answer_prefix"])
    method = KVSharer(ratio=2, calibration_tokens=64)
    answer, m = run_sample(model, tok, method, record_prefill(model, torch.cat([ctx, qst], 1)), ctx, qst, True, 8,
                           eos_ids(model, tok))
    ref = live(model, tok, method, s["context"], s["question"], query_aware=True, max_new_tokens=8,
               answer_prefix=s["answer_prefix"])
    assert answer.strip() == ref["answer"] and m["kv_bytes"] == ref["kv_bytes"]
