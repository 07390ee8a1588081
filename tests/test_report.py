import json

from reference_impls.report import show_evidence


def test_show_evidence_prints_summary_and_full_baseline(tmp_path, capsys):
    summary = [{"setting": "query-aware", "target_ratio": 2.0, "achieved_ratio": 1.98, "n": 30, "accuracy": 0.5,
                "prefill_s": 1.0, "decode_tokens_per_s": 12.0}]
    cfg = {"samples": 30, "tokens": 1500}
    (tmp_path / "m.json").write_text(json.dumps({"config": cfg, "summary": summary, "rows": []}))
    full = [dict(summary[0], target_ratio=1.0, achieved_ratio=1.0, accuracy=1.0)]
    (tmp_path / "full.json").write_text(json.dumps({"config": cfg, "summary": full, "rows": []}))
    data = show_evidence(tmp_path / "m.json", "t", baseline=str(tmp_path / "full.json"), plot=False)
    out = capsys.readouterr().out
    assert data["summary"] == summary
    assert "query-aware           2     1.98  30     0.50" in out
    assert "full cache on the same prompts: query-aware 1.00" in out


def test_show_evidence_missing_file_names_the_command(tmp_path, capsys):
    assert show_evidence("results/eviction/nonexistent.json", "t", plot=False) is None
    assert "scripts/evidence.py --methods nonexistent" in capsys.readouterr().out


def test_decode_memory_returns_kept_slots_and_bytes_per_step(tiny, capsys):
    from reference_impls.eviction.h2o import H2O
    from reference_impls.report import decode_memory

    cache, kept, held = decode_memory(tiny, H2O(budget=12), prompt_tokens=30, steps=3)
    assert len(kept) == 4 and all(k.shape[-1] == 12 for step in kept for k in step)
    assert len(set(held)) == 1  # memory flat while decoding
    assert cache.get_seq_length() == 33


def test_show_bench_prints_one_methods_cells_with_read_ratio_and_full(tmp_path, capsys):
    from reference_impls.report import show_bench

    base = {"task": "passkey", "length": 1000, "n": 30, "model": "m", "dtype": "bfloat16", "commit": "abc"}
    rows = [dict(base, method="full", setting="query-aware", target_ratio=1.0, achieved_ratio=1.0, score=1.0,
                 full_kv_bytes=100),
            dict(base, method="quest", setting="query-aware", target_ratio=4.0, achieved_ratio=0.94, score=0.97,
                 full_kv_bytes=100, read_kv_bytes=25),
            dict(base, method="cam", setting="query-aware", target_ratio=2.0, achieved_ratio=1.94, score=0.5,
                 full_kv_bytes=100)]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r["method"] for r in show_bench("quest", path, plot=False)] == ["quest"]
    out = capsys.readouterr().out
    assert "query-aware           4     0.94   4.00  30     0.97" in out  # read ratio 100 / 25
    assert "full cache on the same prompts: query-aware 1.00" in out and "cam" not in out
    assert show_bench("cam", path, plot=False)[0]["score"] == 0.5
    assert "     -  30     0.50" in capsys.readouterr().out  # no bytes read: no read ratio
    assert show_bench("h2o", path, plot=False) == []
    assert "no cells of h2o" in capsys.readouterr().out
