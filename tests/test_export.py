"""`kvatlas export` and `reference_impls.atlas.export`: JSON that validates against the schema, CSV, BibTeX.

Runs on a fixture atlas (two real entries and two made-up ones) so that it checks the exporter, not the
state of the taxonomy.
"""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from reference_impls.atlas.export import ENTRY_COLUMNS, RESULT_COLUMNS, to_bibtex, to_csv, to_json, to_results_csv
from reference_impls.atlas.schema import Entry

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "taxonomy" / "streamingllm.yaml").read_text()


def made_up(eid: str, arxiv: str, results: str) -> str:
    """streamingllm's entry under another id, arXiv id and BibTeX key, with the given results block."""
    text = GOOD.replace("id: streamingllm", f"id: {eid}").replace("2309.17453", arxiv)
    text = text.replace("xiao2024streamingllm", f"{eid.replace('-', '')}2099")
    return re.sub(r"reported_results:\n(  .*\n)+", results, text)


FIXTURES = {
    "streamingllm": GOOD,
    "fastgen": (ROOT / "taxonomy" / "fastgen.yaml").read_text(),
    "rich-result": made_up("rich-result", "2309.00001", """reported_results:
  - model: Llama-3-8B-Instruct
    benchmark: "LongBench, with a comma"
    subset: average
    metric: score
    compression: 2-bit keys and values
    kv_fraction: 0.125
    value: 41.5
    baseline_value: 42
    paper_version: v2
    source: Table 3
"""),
    "reason-only": made_up("reason-only", "2309.00002", "reported_results: []\n")
    + "no_results_reason: a position paper; it reports no measurements\n",
}


def entries() -> list[Entry]:
    return [Entry.model_validate(yaml.safe_load(t)) for t in FIXTURES.values()]


@pytest.fixture()
def atlas(tmp_path) -> Path:
    """A project root whose taxonomy/ holds the fixture entries."""
    tax = tmp_path / "taxonomy"
    tax.mkdir()
    for name in ("vocabulary.yaml", "schema.json"):
        shutil.copy(ROOT / "taxonomy" / name, tax / name)
    for eid, text in FIXTURES.items():
        (tax / f"{eid}.yaml").write_text(text)
    return tmp_path


def kvatlas(root: Path, *args):
    env = {**os.environ, "KVATLAS_ROOT": str(root), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "reference_impls.cli", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_json_carries_the_version_and_every_entry_validates_against_schema_json():
    doc = json.loads(to_json(entries(), version="9.9.9"))
    assert doc["atlas_version"] == "9.9.9+4" and doc["kvatlas_version"] == "9.9.9" and doc["n_entries"] == 4
    assert [e["id"] for e in doc["entries"]] == sorted(FIXTURES)
    validator = jsonschema.Draft202012Validator(json.loads((ROOT / "taxonomy" / "schema.json").read_text()))
    for e in doc["entries"]:
        errors = [f"{list(err.path)}: {err.message}" for err in validator.iter_errors(e)]
        assert not errors, (e["id"], errors)
        assert Entry.model_validate(e) == next(x for x in entries() if x.id == e["id"])  # lossless
    rich = next(e for e in doc["entries"] if e["id"] == "rich-result")["reported_results"][0]
    assert rich["kv_fraction"] == 0.125 and rich["paper_version"] == "v2" and rich["subset"] == "average"


def test_the_schema_check_catches_a_broken_entry():
    """The JSON check above is not vacuous: schema.json rejects what the validator rejects."""
    validator = jsonschema.Draft202012Validator(json.loads((ROOT / "taxonomy" / "schema.json").read_text()))
    e = json.loads(to_json(entries()))["entries"][0]
    assert not list(validator.iter_errors(e))
    for field, bad in (("principle", "telepathy"), ("arxiv", "23.1"), ("year", "2023")):
        assert list(validator.iter_errors({**e, field: bad})), field
    e["reported_results"][0]["kv_fraction"] = 4
    assert list(validator.iter_errors(e))


def test_csv_has_one_row_per_entry_with_lists_joined_by_semicolons():
    rows = list(csv.DictReader(io.StringIO(to_csv(entries()))))
    assert [r["id"] for r in rows] == sorted(FIXTURES) and list(rows[0]) == ENTRY_COLUMNS
    fastgen = next(r for r in rows if r["id"] == "fastgen")
    assert fastgen["dimensions"] == "sequence;head" and fastgen["builds_on"] == "h2o;scissorhands"
    assert fastgen["authors"].startswith("Suyu Ge;Yunan Zhang;") and fastgen["query_aware"] == "true"
    assert fastgen["bibkey"] == "ge2024fastgen" and fastgen["n_results"] == "5" and fastgen["kvpress"] == ""
    assert next(r for r in rows if r["id"] == "reason-only")["no_results_reason"].startswith("a position paper")


def test_results_csv_has_one_row_per_reported_result():
    rows = list(csv.DictReader(io.StringIO(to_results_csv(entries()))))
    # the live streamingllm and fastgen entries' results (they grow as the atlas does) + the made-up one
    n_live = sum(len(Entry.model_validate(yaml.safe_load(FIXTURES[e])).reported_results) for e in ("streamingllm", "fastgen"))
    assert len(rows) == sum(len(e.reported_results) for e in entries()) == n_live + 1
    assert list(rows[0]) == RESULT_COLUMNS
    rich = next(r for r in rows if r["entry"] == "rich-result")
    assert rich["benchmark"] == "LongBench, with a comma" and rich["kv_fraction"] == "0.125"
    assert rich["baseline_value"] == "42" and rich["source"] == "Table 3" and rich["principle"] == "token-eviction"
    assert not any(r["entry"] == "reason-only" for r in rows)


def test_bibtex_has_every_entry_once_and_refuses_duplicate_keys():
    bib = to_bibtex(entries())
    keys = re.findall(r"^@\w+\{([^,]+),", bib, flags=re.M)
    assert sorted(keys) == sorted(e.bibkey for e in entries()) and len(set(keys)) == 4
    twin = Entry.model_validate({**yaml.safe_load(FIXTURES["rich-result"]), "id": "twin", "arxiv": None})
    with pytest.raises(ValueError, match="'rich-result' and 'twin'"):
        to_bibtex([*entries(), twin])


def test_cli_export_to_stdout_and_to_a_file(atlas, tmp_path):
    res = kvatlas(atlas, "export", "--format", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["n_entries"] == 4
    assert kvatlas(atlas, "export", "--format", "bibtex").stdout == to_bibtex(entries())
    assert kvatlas(atlas, "export", "--format", "csv").stdout == to_csv(entries())
    assert kvatlas(atlas, "export", "--format", "csv", "--results").stdout == to_results_csv(entries())
    out = tmp_path / "atlas.json"
    res = kvatlas(atlas, "export", "--format", "json", "--output", str(out))
    assert res.returncode == 0 and res.stdout == "" and "wrote 4 entries" in res.stderr
    assert json.loads(out.read_text())["entries"] == json.loads(to_json(entries()))["entries"]


@pytest.mark.parametrize("args,needle", [
    (["--format", "yaml"], "invalid choice: 'yaml'"),
    (["--format", "json", "--results"], "--results goes with --format csv"),
    (["--format", "csv", "--output", "/no/such/folder/a.csv"], "folder /no/such/folder does not exist"),
])
def test_cli_export_rejects_bad_arguments(atlas, args, needle):
    res = kvatlas(atlas, "export", *args)
    assert res.returncode == 2 and needle in res.stderr


def test_cli_export_refuses_an_invalid_atlas(atlas):
    (atlas / "taxonomy" / "reason-only.yaml").write_text(FIXTURES["reason-only"].replace("no_results_reason", "#"))
    res = kvatlas(atlas, "export", "--format", "json")
    assert res.returncode == 2 and "reason-only.yaml" in res.stderr and res.stdout == ""
