"""The `kvatlas` command-line contract, run as users' scripts run it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kvatlas(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "reference_impls.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    return res


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(json.dumps({"context": "The sky is blue. " * 20 + "The code is 4711.",
                                       "question": "What is the code?", "answer": "4711"}) for _ in range(2)) + "\n")
    return p


def test_list_json_has_the_contract_fields():
    recs = json.loads(kvatlas("list", "--json").stdout)
    need = {"id", "name", "principle", "dimensions", "training", "phase", "year", "arxiv", "implemented",
            "implementation", "notebook"}
    assert recs and all(need <= set(r) for r in recs)
    assert {"full", "streamingllm"} <= {r["id"] for r in recs if r["implemented"]}


def test_list_filters():
    ids = [r["id"] for r in json.loads(kvatlas("list", "--json", "--principle", "token-eviction").stdout)]
    assert "streamingllm" in ids and "full" not in ids
    impl = json.loads(kvatlas("list", "--json", "--implemented").stdout)
    assert impl and all(r["implemented"] for r in impl)
    res = kvatlas("list", "--principle", "magic")
    assert res.returncode == 2 and "allowed values" in res.stderr


def test_cite_prints_bibtex_and_all_is_one_bib():
    assert kvatlas("cite", "streamingllm").stdout.startswith("@inproceedings{xiao2024streamingllm,")
    bib = kvatlas("cite", "--all").stdout
    assert len(re.findall(r"^@\w+\{", bib, flags=re.M)) == len(json.loads(kvatlas("list", "--json").stdout))
    res = kvatlas("cite", "nope")
    assert res.returncode == 2 and "no taxonomy entry 'nope'" in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["--method", "full", "--input", "/nonexistent.jsonl"], "no such file"),
    (["--method", "no-such", "--input", "IN"], ", full, "),
    (["--method", "streamingllm", "--ratio", "0.5", "--input", "IN"], "must be >= 1"),
    (["--method", "snapkv:bogus=1", "--input", "IN"], "unknown knob 'bogus'; knobs: ratio, budget, layers, heads, window"),
    (["--method", "snapkv:pooling=median", "--input", "IN"], "pooling must be 'avg' or 'max'"),
    (["--method", "snapkv+snapkv", "--input", "IN"], "quant must be a quantization method"),
    (["--method", "full", "--max-new-tokens", "0", "--input", "IN"], "--max-new-tokens"),
])
def test_generate_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path, prompts, args, needle):
    out = tmp_path / "out.jsonl"
    args = [str(prompts) if a == "IN" else a for a in args]
    res = kvatlas("generate", *args, "--output", str(out))
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("text,needle", [
    ('{"context": "x", "question":\n', ":1: not valid JSON"),
    ('{"context": "x"}\n', "question: required string field is missing"),
    ('[1, 2]\n', "must be a JSON object"),
    ("\n", "no prompts"),
])
def test_generate_rejects_malformed_lines(tmp_path, text, needle):
    bad, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    bad.write_text(text)
    res = kvatlas("generate", "--method", "full", "--input", str(bad), "--output", str(out))
    assert res.returncode == 2 and needle in res.stderr and not out.exists()


def test_generate_rejects_a_missing_model(tmp_path, prompts):
    out = tmp_path / "out.jsonl"
    res = kvatlas("generate", "--method", "full", "--model", str(tmp_path / "no-model"), "--input", str(prompts),
                  "--output", str(out))
    assert res.returncode == 2 and "cannot load model" in res.stderr and not out.exists()


@pytest.mark.slow
def test_full_cache_answers_at_least_90_percent_of_20_passkeys(tmp_path):
    """Acceptance of issue #2: 20 prompts of ~1,000 tokens, needle at depths 0-100%."""
    pk, out = tmp_path / "pk.jsonl", tmp_path / "full.jsonl"
    assert kvatlas("passkey", "--n", "20", "--tokens", "1000", "--exact-tokens", "--output", str(pk)).returncode == 0
    res = kvatlas("generate", "--method", "full", "--max-new-tokens", "8", "--input", str(pk), "--output", str(out))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 20
    for r in rows:
        assert r["kv_bytes"] == r["full_kv_bytes"] > 0 and r["achieved_ratio"] == 1.0
        assert r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 and 900 <= r["prompt_tokens"] <= 1150
    score = json.loads(kvatlas("score", str(out)).stdout)
    print(f"full cache: {score['correct']}/20 passkeys")
    assert score["accuracy"] >= 0.9


@pytest.mark.slow
def test_streamingllm_generate_reports_achieved_ratio(tmp_path):
    pk, out = tmp_path / "pk.jsonl", tmp_path / "s.jsonl"
    kvatlas("passkey", "--n", "2", "--tokens", "600", "--output", str(pk))
    for aware in ([], ["--query-aware"]):
        res = kvatlas("generate", "--method", "streamingllm", "--ratio", "4", *aware, "--max-new-tokens", "4",
                      "--input", str(pk), "--output", str(out))
        assert res.returncode == 0, res.stderr
        for r in map(json.loads, out.read_text().splitlines()):
            assert abs(r["achieved_ratio"] - 4) / 4 < 0.05 and r["kv_bytes"] < r["full_kv_bytes"]
            assert r["query_aware"] == bool(aware)
