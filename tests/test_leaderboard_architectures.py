"""The leaderboard's "Architectures" table and the entry pages' "Architecture module" section
(scripts/leaderboard.py), from hand-made rows of `kvatlas arch-bench`, and the checked-in results file."""

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
lb = importlib.import_module("leaderboard")
RESULTS = ROOT / "results" / "architectures" / "bench.jsonl"


def arch_row(arch="mha", constant=False, **kw):
    lengths = [64, 128, 256, 512]
    per_token = {str(n): (4096 / n if constant else 1024.0) for n in lengths}
    return {"arch": arch, "params": 168512, "budget": 168512, "lengths": lengths, "train_length": 128,
            "bytes_per_token": per_token, "constant_state": constant, "state_bytes": 4096 if constant else None,
            "accuracy": {"recall": {"64": 1.0, "128": 0.95, "256": 0.5, "512": 0.1},
                         "copy": {"64": 0.25, "128": 0.0, "256": 0.0, "512": 0.0},
                         "passkey": {"64": 1.0, "128": 1.0, "256": 0.75}},  # one length missing: shown as a dash
            "train_s": 171.4, "train_cpu_s": 150.2, "threads": 1, "train": {"steps": 300, "seed": 0},
            "command": "kvatlas arch-bench --threads 1", "commit": "abc1234", **kw}


def test_the_table_has_bytes_and_accuracy_at_every_length():
    rows = [arch_row(), arch_row("mamba", constant=True, cached=True)]
    table = lb.arch_table(rows, {"mamba": ["mamba"], "mha": ["not-an-entry"]}, {"mamba": "Mamba"})
    assert table[0] == ("| Architecture | Params | Cache bytes per token (16-bit) at 64 / 128 / 256 / 512 | Recall "
                        "accuracy at 64 / 128 / 256 / 512 | Copy accuracy at 64 / 128 / 256 / 512 | Passkey accuracy "
                        "at 64 / 128 / 256 / 512 | Train s (wall / CPU) | Threads |")
    assert table[2] == ("| `mha` | 168,512 | 1024 / 1024 / 1024 / 1024 | 1.00 / 0.95 / 0.50 / 0.10 | "
                        "0.25 / 0.00 / 0.00 / 0.00 | 1.00 / 1.00 / 0.75 / – | 171 / 150 | 1 |")
    assert table[3].startswith("| `mamba` ([Mamba](taxonomy/mamba.md)) | 168,512 | constant state, 4,096 B |")
    assert table[3].endswith("| 171 / 150 (cached) | 1 |")


def test_the_section_is_on_the_leaderboard_with_its_command():
    page = lb.leaderboard_page([], {}, arch=[arch_row(), arch_row("linear", constant=True)])
    assert "## Architectures" in page and "same parameter budget (168,512 parameters" in page
    assert "evaluated at 64, 128, 256, 512 tokens" in page and "steps (300)" in page
    assert "Made by `kvatlas arch-bench --threads 1` at commit `abc1234`" in page
    assert "## Architectures" not in lb.leaderboard_page([], {})  # no rows: no section


def test_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bench.jsonl"
    assert lb.load_arch_rows(path) == []
    path.write_text(json.dumps(arch_row()) + "\n\n" + json.dumps(arch_row("mqa")) + "\n")
    assert [r["source"] for r in lb.load_arch_rows(path)] == ["bench.jsonl:1", "bench.jsonl:3"]
    path.write_text(json.dumps(arch_row()) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: not a JSON object"):
        lb.load_arch_rows(path)
    path.write_text(json.dumps({k: v for k, v in arch_row().items() if k != "commit"}) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:1: missing commit"):
        lb.load_arch_rows(path)


def test_entries_link_their_architecture_module():
    entries = [SimpleNamespace(id="retnet", architecture="reference_impls.architectures.linear.Retention"),
               SimpleNamespace(id="mamba", architecture="reference_impls.architectures.mamba.Mamba"),
               SimpleNamespace(id="gla", architecture="reference_impls.architectures.linear.Retention"),
               SimpleNamespace(id="linear", architecture="reference_impls.architectures.linear"),
               SimpleNamespace(id="h2o", architecture=None)]
    assert lb.arch_entries(entries) == {"mamba": ["mamba"], "linear": ["linear", "gla", "retnet"]}
    line = lb.arch_table([arch_row("linear")], lb.arch_entries(entries), {"gla": "GLA", "retnet": "RetNet"})[2]
    assert line.startswith("| `linear` ([GLA](taxonomy/gla.md), [RetNet](taxonomy/retnet.md)) |")


def test_entry_section_shows_the_module_notebook_and_its_row():
    lines = lb.arch_entry_section("reference_impls.architectures.suite.Passkey", "notebooks/arch_compare.ipynb",
                                  [arch_row("suite"), arch_row("mha")])
    text = "\n".join(lines)
    assert lines[0] == "## Architecture module"
    assert ("[API and source](../api/reference_impls.architectures.suite.md), "
            "[notebook](../notebooks/arch_compare.ipynb)") in text
    assert "from reference_impls.architectures.suite import Passkey" in text
    assert text.count("| `suite` | 168,512 |") == 1 and "| `mha` |" not in text  # only its own row
    module = "\n".join(lb.arch_entry_section("reference_impls.architectures.trainer", "notebooks/x.py", []))
    assert "import" not in module and "Trained on the synthetic suite" not in module  # a module path; no row yet


@pytest.mark.skipif(not RESULTS.is_file(), reason="no checked-in results/architectures/bench.jsonl yet")
def test_the_checked_in_results():
    rows = lb.load_arch_rows(RESULTS)
    assert len({r["arch"] for r in rows}) == len(rows) >= 1
    for r in rows:
        assert len(r["lengths"]) == 4 and r["lengths"][-1] == 4 * r["train_length"]
        assert all(0 <= a <= 1 for per in r["accuracy"].values() for a in per.values())
        assert r["threads"] == 1 and r["command"].startswith("kvatlas arch-bench")
    assert len({r["params"] for r in rows}) >= 1
    budget = rows[0]["budget"]
    assert all(abs(r["params"] - budget) <= 0.1 * budget for r in rows)
    assert "| Architecture |" in "\n".join(lb.arch_table(rows, {}, {}))
