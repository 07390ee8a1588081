"""The leaderboard and findings pages (scripts/leaderboard.py, scripts/findings.py): their pure functions on
hand-made rows, the pages made from the fixture tests/fixtures/bench/grid_sample.jsonl, and (slow) the site
built from that fixture."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bench"
sys.path.insert(0, str(ROOT / "scripts"))  # findings imports leaderboard by name, as gen_pages does
lb = importlib.import_module("leaderboard")
fd = importlib.import_module("findings")
PHASE = {"snapkv": "prefill", "pyramidkv": "prefill", "h2o": "both", "streamingllm": "both", "kivi": "both",
         "flexgen": "both", "full": "both"}


def row(method="snapkv", score=1.0, full=1.0, task="passkey", target=4.0, setting="query-aware", family=None,
        category=None, kv=100, length=2000, **kw):
    ids = [p.split(":")[0] for p in method.split("+")]
    family = family or ("baseline" if method == "full" else "quantization" if ids[0] in ("kivi", "flexgen")
                        else "eviction")
    return {"method": method, "label": " + ".join(ids), "ids": ids, "family": family, "target_ratio": target,
            "achieved_ratio": target * 0.98, "task": task,
            "category": category or ("synthetic retrieval" if task == "passkey" else "QA"), "length": length,
            "setting": setting, "score": score, "full_score": full, "n": 10, "kv_bytes": kv,
            "command": "kvatlas bench --quick", "commit": "abc1234", **kw}


# ---------------------------------------------------------------------------------------------------- rows
def test_pareto_front():
    #          0: best score, most bytes  1: dominated by 0 and 2  2: fewer bytes  3: fewest, worst  4: equals 2
    points = [(100, 1.0), (90, 0.5), (50, 0.8), (10, 0.1), (50, 0.8)]
    assert lb.pareto_front(points) == [0, 2, 3, 4]
    assert lb.pareto_front([(10, 0.5)]) == [0]
    assert lb.pareto_front([(10, 0.5), (10, 0.6)]) == [1]  # same bytes, higher score wins


def test_overall_averages_each_task_first():
    rows = [row(task="passkey", score=1.0), row(task="passkey", score=0.0, length=4000),
            row(task="qa", score=0.4, full=0.5), row(method="h2o", score=0.2),
            row(method="h2o", score=0.2, setting="query-agnostic", full=0.0),
            row(method="full", task="cwe", score=0.1, dropped="full-cache score 0.10 < 0.6")]
    by = {(o["method"], o["setting"]): o for o in lb.overall(rows)}
    snap = by[("snapkv", "query-aware")]
    assert snap["tasks"] == 2 and ("full", "query-aware") not in by  # a dropped task has no overall row
    # each task at its main length (passkey: 2000, where most cells ran; the 4000-token sweep cell is left out)
    assert snap["score"] == pytest.approx((1.0 + 0.4) / 2)
    assert snap["relative"] == pytest.approx((1.0 + 0.8) / 2)
    assert by[("h2o", "query-agnostic")]["relative"] is None      # full cache scored 0: no relative score
    assert [o["method"] for o in lb.overall(rows) if o["setting"] == "query-aware"] == ["snapkv", "h2o"]


def test_load_rows_names_file_and_line(tmp_path):
    good = json.dumps(row())
    (tmp_path / "a.jsonl").write_text(good + "\n\n" + json.dumps(row(target=8.0)) + "\n" + good + "\n")
    # blank lines skipped; a cell measured twice (every shard runs the full cache) kept once
    assert [r["source"] for r in lb.load_rows(tmp_path)] == ["a.jsonl:1", "a.jsonl:3"]
    (tmp_path / "a.samples.jsonl").write_text('{"cell": "x", "sample": 0}\n')  # a sidecar is not a cell file
    (tmp_path / "quick.jsonl").write_text(json.dumps(row(target=2.0)) + "\n")  # the quick grid is shown apart
    assert len(lb.load_rows(tmp_path)) == 2 and [r["source"] for r in lb.load_rows(tmp_path, quick=True)] == [
        "quick.jsonl:1"]
    (tmp_path / "a.samples.jsonl").unlink()
    (tmp_path / "quick.jsonl").unlink()
    (tmp_path / "b.jsonl").write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not a JSON object"):
        lb.load_rows(tmp_path)
    (tmp_path / "b.jsonl").write_text(json.dumps({k: v for k, v in row().items() if k != "full_score"}) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:1: missing full_score"):
        lb.load_rows(tmp_path)
    assert lb.load_rows(tmp_path / "absent") == []


def test_method_links_each_part_of_a_composition():
    names = {"snapkv": "SnapKV", "kivi": "KIVI"}
    assert (lb.method_md("snapkv:window=32+kivi:bits=4", ["snapkv", "kivi"], names)
            == "[SnapKV](taxonomy/snapkv.md) `window=32` + [KIVI](taxonomy/kivi.md) `bits=4`")
    assert lb.method_md("mystery", ["mystery"], names) == "mystery"  # not in the taxonomy: no link


# ---------------------------------------------------------------------------------------------------- verdicts
def two_families(quant_worst: float) -> list[dict]:
    return [row("kivi", 1.0), row("kivi", quant_worst, task="qa"), row("snapkv", 0.6), row("snapkv", 0.9, task="qa")]


@pytest.mark.parametrize("quant_worst, verdict", [(0.9, "agrees"), (0.62, "inconclusive"), (0.3, "disagrees")])
def test_quantization_robust_verdict(quant_worst, verdict):
    assert fd.quantization_robust(two_families(quant_worst)).verdict == verdict


def test_retrieval_verdict_and_not_testable():
    rows = [row("h2o", 0.3), row("h2o", 0.9, task="qa"), row("kivi", 1.0)]
    f = fd.eviction_retrieval(rows)
    assert f.verdict == "agrees" and "0.90 vs 0.30" in f.reason
    assert fd.eviction_retrieval(rows[:1]).verdict.startswith("not testable here because")


def test_prefill_verdict_uses_the_taxonomy_phase():
    rows = [row("snapkv", 0.5), row("h2o", 0.9), row("h2o", 0.1, target=8.0)]  # 8x: only one group ran it
    f = fd.prefill_uncompressed(rows, PHASE)
    assert f.verdict == "agrees" and "0.90 vs 0.50" in f.reason
    assert fd.prefill_uncompressed(rows, {**PHASE, "h2o": "prefill"}).verdict.startswith("not testable")


def test_order_verdict_names_the_pairs_out_of_order():
    rows = [row("full", 1.0, target=1.0), row("kivi", 0.99), row("h2o", 0.5), row("streamingllm", 0.7)]
    f = fd.method_order(rows)
    assert f.verdict == "disagrees" and "h2o (0.50) not above streamingllm (0.70)" in f.reason
    rows[-1]["score"] = 0.4
    assert fd.method_order(rows).verdict == "agrees"
    rows[1]["score"] = 0.8  # KIVI no longer about as good as the full cache
    assert "kivi (0.80) not within 0.05" in fd.method_order(rows).reason


def test_query_setting_verdict():
    rows = [row("snapkv", 0.9), row("snapkv", 0.2, setting="query-agnostic"), row("kivi", 1.0)]
    f = fd.query_settings(rows)
    assert f.verdict == "disagrees" and "query-agnostic 0.20 vs query-aware 0.90" in f.reason
    rows[1]["score"] = 0.88
    assert fd.query_settings(rows).verdict == "agrees"
    assert fd.query_settings(rows[:1]).verdict.startswith("not testable")


# ---------------------------------------------------------------------------------------------------- pages
def test_pages_from_the_fixture():
    rows = lb.load_rows(FIXTURE)
    assert len(rows) >= 40 and {r["family"] for r in rows} == {"baseline", "eviction", "quantization",
                                                                "eviction + quantization"}
    page = lb.leaderboard_page(rows, {"snapkv": "SnapKV", "kivi": "KIVI"}, "tests/fixtures/bench")
    assert "Made-up rows" in page and "16-bit (bf16/fp16) full cache" in page
    assert "| Method | Family | Setting | Target ratio (×) | Achieved ratio (×, 16-bit unit) |" in page
    assert "| Score | Full cache score | Relative | KV MiB | Peak KV MiB |" in page  # full score beside every row
    assert [h for h in re.findall(r"^## (.*)", page, re.M)] == ["Overall", "Task: passkey", "Task: qa",
                                                                "Task: variable-tracking", "Method × task"]
    assert page.count('<svg class="kv-chart kv-pareto"') == 4      # passkey twice (both settings), qa, tracking
    assert page.count('class="kv-front"') == 4 and page.count('<table class="kv-heat">') == 3
    assert "[SnapKV](taxonomy/snapkv.md) `window=32` + [KIVI](taxonomy/kivi.md) `bits=4`" in page
    assert page.count("Made by `kvatlas bench") == 1 + 4 + 3 + 3  # overall, figures, task tables, heatmaps
    findings = fd.findings_page(rows, PHASE)
    assert "Made-up rows" in findings and "Made-up rows" not in lb.leaderboard_page(two_families(1.0), {})
    verdicts = re.findall(r"\*\*Verdict: (.*?)\.\*\*", findings)
    assert verdicts == ["agrees", "agrees", "disagrees", "agrees", "disagrees"]


def test_pages_without_results_say_how_to_make_them():
    assert "`kvatlas bench --quick`" in lb.leaderboard_page([], {})
    assert fd.findings_page([], PHASE).count("**Verdict: not testable here because there are no benchmark") == 5


@pytest.mark.slow
def test_site_built_from_the_fixture(tmp_path):
    """The strict layout build with KVATLAS_BENCH_RESULTS pointing at the fixture: tables render as tables."""
    env = dict(os.environ, KVATLAS_BENCH_RESULTS="tests/fixtures/bench", KVATLAS_EXECUTE_NOTEBOOKS="false",
               PYTHONPATH=str(ROOT))
    mkdocs = Path(sys.executable).with_name("mkdocs")
    subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    for page, tables in (("leaderboard", 4 + 3), ("findings", 5), ("evidence", 4)):
        text = (tmp_path / "site" / page / "index.html").read_text()
        assert text.count("<table") >= tables, page
        assert "|---|" not in text, f"{page}: a Markdown table left as text"
    assert "fp32 unit" in (tmp_path / "site" / "evidence" / "index.html").read_text()


def test_passkey_evidence_is_shown_apart_with_the_read_ratio(tmp_path):
    (tmp_path / "grid.jsonl").write_text(json.dumps(row()) + "\n")
    ev = row(method="quest", target=4.0)
    ev.update(ids=["quest"], family="retrieval", full_kv_bytes=4000, kv_bytes=4000, read_kv_bytes=1000, n=30)
    (tmp_path / "passkey-retrieval.jsonl").write_text(json.dumps(ev) + "\n")
    assert len(lb.load_rows(tmp_path)) == 1  # not in the main grid's tables
    rows = lb.load_rows(tmp_path, group="passkey-")
    assert [r["method"] for r in rows] == ["quest"]
    page = lb.leaderboard_page(lb.load_rows(tmp_path), {}, passkey=rows)
    line = next(x for x in page.splitlines() if x.startswith("| quest"))
    assert "| 4.00 |" in line and "| retrieval |" in line  # read ratio: 4000 / 1000
