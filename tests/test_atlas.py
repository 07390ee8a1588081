"""`kvatlas validate` on broken entries: one clear `file:line: field: message` per problem, never a traceback."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impls.atlas.schema import VOCAB
from reference_impls.atlas.validate import load_entries

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "taxonomy" / "streamingllm.yaml").read_text()


def kvatlas(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "reference_impls.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def edit(text, field, new_line):
    """Replace the line starting with `field:` by `new_line` (None deletes it)."""
    lines = text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(f"{field}:"))
    if new_line is None:
        del lines[i]
    else:
        lines[i] = new_line
    return "\n".join(lines) + "\n"


def fresh(text, eid="fixture-entry"):
    """The good entry under another id, arXiv id and BibTeX key, so it clashes with nothing in taxonomy/."""
    return (edit(text, "id", f"id: {eid}").replace("2309.17453", "2309.00001")
            .replace("xiao2024streamingllm", f"{eid.replace('-', '')}2099"))


def result_field(text, line):
    """Add `line` to the first reported result (before its source)."""
    return text.replace("    source: Abstract\n", f"    {line}\n    source: Abstract\n", 1)


def no_results(text, reason_line=None):
    """Empty the reported results; optionally add a `no_results_reason` line."""
    text = re.sub(r"reported_results:\n(  .*\n)+", "reported_results: []\n", text)
    return text + (reason_line + "\n" if reason_line else "")


# (name, transform of the good text, the field the message must name, a fragment of the message)
CASES = [
    ("yaml-syntax", lambda t: t.replace("name: StreamingLLM", "name: [StreamingLLM"), "yaml", "invalid YAML"),
    ("missing-field", lambda t: edit(t, "title", None), "title", "required field is missing"),
    ("unknown-principle", lambda t: edit(t, "principle", "principle: telepathy"), "principle",
     "allowed values: baseline, quantization"),
    ("unknown-dimension", lambda t: edit(t, "dimensions", "dimensions: [tokens]"), "dimensions[0]", "allowed values"),
    ("unknown-training", lambda t: edit(t, "training", "training: none"), "training", "training-free"),
    ("unknown-phase", lambda t: edit(t, "phase", "phase: always"), "phase", "allowed values"),
    ("year-wrong-type", lambda t: edit(t, "year", "year: last-year"), "year", "valid integer"),
    ("year-as-string", lambda t: edit(t, "year", 'year: "2023"'), "year", "valid integer"),
    ("bool-wrong-type", lambda t: edit(t, "query_aware", "query_aware: maybe"), "query_aware", "boolean"),
    ("bad-arxiv", lambda t: edit(t, "arxiv", 'arxiv: "not-an-id"'), "arxiv", "not an arXiv id"),
    ("arxiv-unquoted-number", lambda t: edit(t, "arxiv", "arxiv: 2309.17453"), "arxiv", "string"),
    ("bad-url", lambda t: edit(t, "url", "url: arxiv.org/abs/2309.17453"), "url", "pattern"),
    ("bad-bibtex", lambda t: t.replace("@inproceedings{xiao2024streamingllm,", "inproceedings xiao2024"), "bibtex",
     "must start like"),
    ("bibtex-no-title", lambda t: t.replace("    title     = {Efficient Streaming Language Models with Attention Sinks},\n", ""),
     "bibtex", "lacks the 'title'"),
    ("short-summary", lambda t: re.sub(r"summary: >-\n(  .*\n)+", "summary: Too short.\n", t), "summary", "at least"),
    ("unknown-field", lambda t: t + "colour: blue\n", "colour", "unknown field"),
    ("dangling-builds-on", lambda t: edit(t, "builds_on", "builds_on: [no-such-method]"), "builds_on[0]",
     "no taxonomy entry with id 'no-such-method'"),
    ("dangling-implementation", lambda t: edit(t, "implementation", "implementation: reference_impls.eviction.nope.Nope"),
     "implementation", "cannot be imported"),
    ("dangling-notebook", lambda t: edit(t, "notebook", "notebook: notebooks/nope.py"), "notebook", "does not exist"),
    ("result-bad-source", lambda t: t.replace("source: Abstract", "source: somewhere"), "reported_results[0].source",
     "pattern"),
    ("result-missing-value", lambda t: t.replace("    value: 22.2\n", ""), "reported_results[0].value", "missing"),
    ("id-not-file-name", lambda t: edit(t, "id", "id: streaming-llm"), "id", "must equal the file name"),
    ("not-a-mapping", lambda t: "- just\n- a list\n", "entry", "mapping"),
    # issue #17: the result fields, the result-or-reason rule, and the rest of the schema's rules
    ("kv-fraction-zero", lambda t: result_field(t, "kv_fraction: 0.0"), "reported_results[0].kv_fraction",
     "not a fraction in (0, 1]"),
    ("kv-fraction-above-one", lambda t: result_field(t, "kv_fraction: 4.0"), "reported_results[0].kv_fraction",
     "0.25 = 4x smaller"),
    ("kv-fraction-percent", lambda t: result_field(t, 'kv_fraction: "25%"'), "reported_results[0].kv_fraction",
     "not a fraction in (0, 1]"),
    ("paper-version-bare-number", lambda t: result_field(t, 'paper_version: "2"'),
     "reported_results[0].paper_version", "allowed values look like 'v1', 'v2'"),
    ("paper-version-unquoted-int", lambda t: result_field(t, "paper_version: 2"), "reported_results[0].paper_version",
     "valid string"),
    ("empty-subset", lambda t: result_field(t, 'subset: ""'), "reported_results[0].subset", "at least 1 character"),
    ("result-unknown-field", lambda t: result_field(t, "note: from the talk"), "reported_results[0].note",
     "allowed fields: model, benchmark, metric, compression, value, baseline_value, subset, kv_fraction"),
    ("result-value-as-string", lambda t: t.replace("    value: 22.2\n", '    value: "22.2"\n'),
     "reported_results[0].value", "valid number"),
    ("no-result-no-reason", lambda t: no_results(t), "reported_results",
     "at least one reported result or a no_results_reason"),
    ("no-result-short-reason", lambda t: no_results(t, "no_results_reason: none"), "no_results_reason",
     "at least 10 characters"),
    ("dangling-compared-with", lambda t: edit(t, "compared_with", "compared_with: [h2o, no-such-method]"),
     "compared_with[1]", "no taxonomy entry with id 'no-such-method'"),
    ("arxiv-with-version", lambda t: edit(t, "arxiv", 'arxiv: "2309.17453v2"'), "arxiv", 'like "2402.02750"'),
    ("doi-as-url", lambda t: edit(t, "url", "url: https://arxiv.org/abs/2309.17453\ndoi: https://doi.org/10.1/x"),
     "doi", "no https://doi.org/ prefix"),
    ("bad-code-url", lambda t: edit(t, "code", "code: github.com/mit-han-lab/streaming-llm"), "code", "https?://"),
    ("unknown-also", lambda t: edit(t, "principle", "principle: token-eviction\nalso: [telepathy]"), "also[0]",
     "allowed values: baseline, quantization, token-eviction"),
    ("unknown-granularity", lambda t: edit(t, "granularity", "granularity: word"), "granularity",
     "allowed values: token, block, channel"),
    ("unknown-budget-policy", lambda t: edit(t, "budget_policy", "budget_policy: fixed"), "budget_policy",
     "allowed values: uniform, per-layer, per-head, adaptive, not-applicable"),
    ("unknown-benchmark-category", lambda t: edit(t, "benchmark_category", "benchmark_category: eviction"),
     "benchmark_category", "allowed values: kv-quantization, token-dropping"),
    ("id-not-a-slug", lambda t: edit(t, "id", "id: StreamingLLM"), "id", "not a slug"),
    ("empty-authors", lambda t: edit(t, "authors", "authors: []"), "authors", "at least 1 item"),
    ("empty-dimensions", lambda t: edit(t, "dimensions", "dimensions: []"), "dimensions", "at least 1 item"),
    ("year-too-early", lambda t: edit(t, "year", "year: 1890"), "year", "greater than or equal to 1990"),
    ("bibtex-unbalanced", lambda t: t.replace("archivePrefix = {arXiv}", "archivePrefix = {arXiv"), "bibtex",
     "unbalanced braces"),
    ("summary-six-sentences", lambda t: re.sub(r"summary: >-\n(  .*\n)+", "summary: " + "It is a sentence. " * 6
                                               + "\n", t), "summary", "2-5 sentences"),
    ("implementation-without-notebook", lambda t: edit(t, "notebook", None), "notebook", "also needs its notebook"),
]


@pytest.mark.parametrize("name,transform,field,fragment", CASES, ids=[c[0] for c in CASES])
def test_each_malformed_entry_gets_a_clear_message(tmp_path, name, transform, field, fragment):
    path = tmp_path / "streamingllm.yaml"
    path.write_text(transform(GOOD))
    _, problems = load_entries([path])
    mine = [p for p in problems if p.field == field]
    assert mine, f"no problem reported for field {field!r}; got {[str(p) for p in problems]}"
    assert any(fragment in p.message for p in mine), [str(p) for p in mine]
    assert all(p.file.endswith("streamingllm.yaml") and p.line >= 1 for p in problems)
    assert any(str(p).startswith(f"{p.file}:{p.line}: {field}: ") for p in mine)  # the line users read


def test_there_are_at_least_30_malformed_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_a_reason_alone_is_enough_and_both_are_allowed(tmp_path):
    path = tmp_path / "fixture-entry.yaml"
    path.write_text(no_results(fresh(GOOD), "no_results_reason: the paper reports latency only, in figures"))
    assert load_entries([path])[1] == []
    path.write_text(fresh(GOOD) + "no_results_reason: only one speed-up, no accuracy table\n")
    assert load_entries([path])[1] == []


def test_the_no_results_rule_points_at_its_line(tmp_path):
    path = tmp_path / "streamingllm.yaml"
    path.write_text(no_results(GOOD))
    (p,) = load_entries([path])[1]
    assert path.read_text().splitlines()[p.line - 1].startswith("reported_results:")


def test_a_table_without_paper_version_is_a_warning_not_an_error(tmp_path):
    path = tmp_path / "fixture-entry.yaml"
    path.write_text(fresh(GOOD))
    before = len(load_entries([path], warnings=True)[1])  # the entry the fixture copies may carry some already
    path.write_text(fresh(GOOD).replace("source: Abstract", "source: Table 2", 1))
    assert load_entries([path])[1] == []  # warnings only on request
    warnings = load_entries([path], warnings=True)[1]
    assert len(warnings) == before + 1
    (w,) = [w for w in warnings if "'Table 2'" in w.message and w.field == "reported_results[0].paper_version"]
    assert w.level == "warning"
    res = kvatlas("validate", str(path))
    assert res.returncode == 0 and ": reported_results[0].paper_version: warning: " in res.stdout
    assert f"{before + 1} warnings" in res.stderr
    path.write_text(fresh(GOOD).replace("source: Abstract", "paper_version: v2\n    source: Table 2", 1))
    assert len(load_entries([path], warnings=True)[1]) == before


def test_a_duplicate_bibtex_key_names_both_files(tmp_path):
    (tmp_path / "aa.yaml").write_text(fresh(GOOD, "aa"))
    (tmp_path / "bb.yaml").write_text(fresh(GOOD, "bb").replace("2309.00001", "2309.00002").replace("bb2099", "aa2099"))
    probs = load_entries([tmp_path / "aa.yaml", tmp_path / "bb.yaml"])[1]
    (p,) = probs
    assert p.file.endswith("bb.yaml") and p.field == "bibtex" and "duplicate BibTeX key 'aa2099'" in p.message
    assert "aa.yaml" in p.message


def test_line_numbers_point_at_the_field(tmp_path):
    path = tmp_path / "streamingllm.yaml"
    path.write_text(edit(GOOD, "phase", "phase: always"))
    (p,) = [p for p in load_entries([path])[1] if p.field == "phase"]
    assert path.read_text().splitlines()[p.line - 1].startswith("phase:")


def test_duplicates_are_detected(tmp_path):
    (tmp_path / "aa.yaml").write_text(edit(GOOD, "id", "id: aa"))
    other = edit(edit(GOOD, "id", "id: bb"), "arxiv", 'arxiv: "2309.17453"')
    (tmp_path / "bb.yaml").write_text(other)
    probs = [str(p) for p in load_entries([tmp_path / "aa.yaml", tmp_path / "bb.yaml"])[1]]
    assert any("duplicate arXiv id '2309.17453'" in p for p in probs)
    assert any("duplicate BibTeX key" in p for p in probs)


def test_cli_validate_reports_without_traceback(tmp_path):
    for name, transform, field, _ in CASES:
        path = tmp_path / name / "streamingllm.yaml"
        path.parent.mkdir()
        path.write_text(transform(GOOD))
    res = kvatlas("validate", *sorted(str(p) for p in tmp_path.glob("*/streamingllm.yaml")))
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len({l.split(":")[0] for l in lines}) == len(CASES)  # every file reported
    assert all(re.match(r"^\S+\.yaml:\d+: \S+: .+", l) for l in lines), lines


def test_the_taxonomy_is_valid_and_schema_json_is_current():
    res = kvatlas("validate")
    assert res.returncode == 0, res.stdout + res.stderr
    assert kvatlas("schema", "--check").returncode == 0, "run `kvatlas schema` and commit taxonomy/schema.json"


def test_every_implementation_has_one_entry_and_its_files_exist():
    entries, problems = load_entries()
    assert not problems
    impls = [e.implementation for e in entries if e.implementation]
    assert len(impls) == len(set(impls)), "an implementation is linked from two entries"
    for e in entries:
        if e.implementation:
            assert (ROOT / e.notebook).is_file()
            module = e.implementation.split(".")[1:-1]
            test = ROOT / "tests" / module[0] / f"test_{module[-1]}.py"
            if module[0] == "baseline":
                test = ROOT / "tests" / "test_integration.py"
            assert test.is_file(), f"{e.id}: no test file {test}"
    # and every KVMethod class in the package is linked from exactly one entry
    import importlib
    import pkgutil

    import reference_impls
    from reference_impls.base import KVMethod

    classes = set()
    for mod in pkgutil.walk_packages(reference_impls.__path__, "reference_impls."):
        if mod.name.endswith(("_triton", "integration", "cli")):
            continue
        m = importlib.import_module(mod.name)
        for obj in vars(m).values():
            if (isinstance(obj, type) and issubclass(obj, KVMethod) and obj.__module__ == m.__name__
                    and isinstance(vars(obj).get("name"), str) and vars(obj)["name"]
                    and not obj.__name__.startswith("_")):
                classes.add(f"{obj.__module__}.{obj.__name__}")
    missing = classes - set(impls)
    assert not missing, f"methods without a taxonomy entry: {sorted(missing)}"


def test_vocabulary_values_all_have_definitions():
    for field, values in VOCAB.items():
        assert values and all(isinstance(v, str) and len(v) > 10 for v in values.values()), field


def test_new_scaffolds_four_files_and_refuses_to_overwrite(tmp_path):
    root = tmp_path / "atlas"
    shutil.copytree(ROOT / "taxonomy", root / "taxonomy")
    env_cwd = root
    import os
    env = {**os.environ, "KVATLAS_ROOT": str(root)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "reference_impls.cli", *a], cwd=env_cwd, env=env,
                                    capture_output=True, text=True, timeout=120)
    res = run("new", "my-method", "--principle", "token-merging")
    assert res.returncode == 0, res.stderr
    for rel in ("taxonomy/my-method.yaml", "reference_impls/merging/my_method.py", "tests/merging/test_my_method.py",
                "notebooks/my_method.py"):
        assert (root / rel).is_file(), rel
    assert "NotImplementedError" in (root / "reference_impls/merging/my_method.py").read_text()
    # the scaffold entry is not valid until filled in
    res = run("validate", str(root / "taxonomy/my-method.yaml"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = run("new", "my-method", "--principle", "token-merging")
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr
    res = run("new", "x2", "--principle", "magic")
    assert res.returncode == 2 and "allowed values" in res.stderr
