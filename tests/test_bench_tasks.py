"""The bench task suite: well-formed samples, metrics against hand-computed values, readers on fixtures."""

import collections
import inspect
import importlib
import json
import re
from pathlib import Path

import pytest

from reference_impls.bench.metrics import METRICS, contains, edit_sim, exact, f1, recall, rouge_l
from reference_impls.bench.readers import read_jsonl, read_longbench, read_ruler
from reference_impls.bench.tasks import TASKS, Task, get_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
EXTRACTIVE = [name for name in TASKS if name != "code"]  # code's answer is the line after the context


# ---------------------------------------------------------------------------------------------- samples
@pytest.mark.parametrize("name", list(TASKS))
def test_samples_are_well_formed_and_about_the_asked_length(name):
    task = TASKS[name]
    assert task.metric in METRICS and task.max_new_tokens >= 8 and task.lengths
    for x in task.samples(4, 1500, seed=0):
        assert all(isinstance(x[k], str) and x[k] for k in ("context", "question", "answer"))
        assert isinstance(x.get("answer_prefix", ""), str)
        assert all(isinstance(a, str) for a in x.get("answers", []))
        assert abs(len(x["context"]) / 4.2 - 1500) <= 0.15 * 1500  # the tokenizer-free estimate
        if name in EXTRACTIVE:
            assert all(a in x["context"] for a in x.get("answers") or [x["answer"]])
        assert task.score(x["answer"], x) == 1.0  # the reference itself scores full marks


@pytest.mark.parametrize("name", list(TASKS))
def test_samples_are_deterministic_under_a_seed(name):
    task = TASKS[name]
    assert task.samples(3, 800, seed=1) == task.samples(3, 800, seed=1)
    assert task.samples(3, 800, seed=1) != task.samples(3, 800, seed=2)


def test_needle_counts():
    for x in TASKS["multikey"].samples(3, 1000, seed=0):
        assert x["context"].count("The access code for the ") == 4
        assert x["context"].count(f"The access code for the {x['label']} is {x['answer']}.") == 1
    for x in TASKS["multivalue"].samples(3, 1000, seed=0):
        assert [m for m in re.findall(rf"access codes for the {x['label']} is (\d+)", x["context"])] == x["answers"]
    for x in TASKS["vartrack"].samples(3, 1000, seed=0):
        names = x["answers"]
        assert len(names) == 4 and x["context"].count("VAR ") == 4 + 3  # 4 statements, 3 of them name a variable
        assert all(f"VAR {b} = VAR {a}." in x["context"] for a, b in zip(names, names[1:]))
        assert x["context"].index(names[0]) < x["context"].index(f"VAR {names[-1]} =")  # the chain reads in order
    for x in TASKS["cwe"].samples(3, 1000, seed=0):
        counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", x["context"], flags=re.M))
        assert {w for w, _ in counts.most_common(3)} == set(x["answers"]) and counts.most_common(4)[3][1] <= 3


def test_depths_spread_and_needles_sit_there():
    for name in ("passkey", "multikey"):
        xs = TASKS[name].samples(5, 1500, seed=0)
        assert [x["depth"] for x in xs][0] == 0 and xs[-1]["depth"] == 1
        for x in xs:
            at = x["context"].index(x["answer"]) / len(x["context"])
            assert abs(at - x["depth"]) < 0.1, (name, at, x["depth"])
    assert [round(x["depth"], 1) for x in TASKS["docqa"].samples(3, 1500, seed=0)] == [0.0, 0.5, 1.0]


def test_code_answer_is_the_source_line_after_the_context():
    for x in TASKS["code"].samples(4, 1000, seed=0):
        lines = inspect.getsource(importlib.import_module(x["module"])).splitlines()
        assert lines[x["line"] - 1].strip() == x["answer"] and x["context"].endswith(lines[x["line"] - 2])
        assert not x["answer"].startswith("#")


def test_fewshot_asks_every_label_and_shows_it():
    xs = TASKS["fewshot"].samples(6, 1500, seed=0)
    labels = {x["answer"] for x in xs}
    assert len(labels) == 3
    for x in xs:
        assert all(x["context"].count(f"Module: {lab}") >= 10 for lab in labels)
        assert x["question"].removeprefix("Sentence: ") not in x["context"]  # the asked sentence is new


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    assert contains("The passkey is 12345.", ["12345"]) == 1.0 and contains("1234", ["12345"]) == 0.0
    assert contains("Module:  TarFile", ["tarfile"]) == 1.0 and contains("anything", [""]) == 0.0
    assert recall("codes 111 and 333", ["111", "222", "333"]) == pytest.approx(2 / 3) and recall("x", []) == 0.0
    assert exact("  Paragraph 3.\nmore text", ["paragraph 3"]) == 1.0 and exact("Paragraph 31", ["Paragraph 3"]) == 0
    assert edit_sim("```python\nreturn x\n```", ["return x"]) == 1.0
    assert edit_sim("abcd", ["abce"]) == 0.75  # 2 * 3 matching characters / 8
    assert edit_sim("", ["x"]) == 0.0
    assert f1("the Avon river", ["Avon"]) == pytest.approx(2 / 3)  # p = 1/2 ("the" dropped), r = 1
    assert f1("the Avon river", ["Avon", "Avon river"]) == 1.0 and f1("", ["x"]) == 0.0
    assert rouge_l("the cat sat on the mat", ["the cat on mat"]) == pytest.approx(0.8)  # LCS 4: p 4/6, r 1
    assert rouge_l("a b c", ["x y"]) == 0.0 and rouge_l("a b", ["b a"]) == pytest.approx(0.5)


def test_score_uses_all_answers_under_recall():
    x = {"answer": "111, 222", "answers": ["111", "222"]}
    assert TASKS["multivalue"].score("The codes are 222.", x) == 0.5


# ---------------------------------------------------------------------------------------------- errors
def test_get_task_names_the_allowed_values():
    assert get_task("passkey") is TASKS["passkey"]
    with pytest.raises(ValueError, match=r"unknown task 'pasky'.*passkey.*docqa.*jsonl:PATH.*ruler:PATH"):
        get_task("pasky")


def test_task_arguments_are_checked():
    with pytest.raises(ValueError, match="metric 'bleu' is not one of contains"):
        Task("t", "c", "bleu", 8, (100,), lambda *a: [])
    with pytest.raises(ValueError, match="passkey: n must be"):
        TASKS["passkey"].samples(0, 1000)
    with pytest.raises(ValueError, match="n_tokens must be"):
        TASKS["passkey"].samples(2, 10)


# ---------------------------------------------------------------------------------------------- readers
def test_read_jsonl_fixture():
    task = get_task(f"jsonl:{FIXTURES / 'mine.jsonl'}")
    assert (task.name, task.metric) == ("jsonl:mine", "contains")
    xs = task.samples(2, 1000)
    assert len(xs) == 2 and xs[0]["answer"] == "4711" and xs[0]["answer_prefix"] == "The badge number is"
    assert task.score("It is 4711.", xs[0]) == 1.0 and len(task.samples(10, 1000)) == 3


def test_read_longbench_fixture():
    task = read_longbench(str(FIXTURES / "longbench_hotpotqa.jsonl"))
    assert (task.name, task.metric, task.category) == ("longbench:hotpotqa", "f1", "multi-doc QA")
    x = task.samples(1, 1000)[0]
    assert x["question"].endswith("Which river flows past the old mill?") and x["context"].startswith("Passage 1:")
    assert task.score("Avon", x) == 1.0 and task.score("Thames", x) == 0.0


def test_read_ruler_fixture_splits_off_the_question():
    task = read_ruler(str(FIXTURES / "ruler_niah.jsonl"))
    assert (task.name, task.metric) == ("ruler:ruler_niah", "recall")
    a, b, c = task.samples(3, 1000)
    assert a["question"].startswith("What are all") and "What are all" not in a["context"]
    assert a["answer_prefix"].startswith("The special magic numbers")
    assert b["question"].startswith("Question: Find all") and b["answers"] == ["QPMZJ", "ABCDE"]
    assert c["question"] == "" and c["context"].endswith("apple plum apple")
    assert task.score("QPMZJ only", b) == 0.5


_LB = {"input": "q", "context": "c"}


@pytest.mark.parametrize("reader, row, match", [
    (read_jsonl, {"context": "c", "question": "q"}, r"bad.jsonl:2: answer: required str"),
    (read_jsonl, {"context": "c", "question": "q", "answer": "a", "answer_prefix": 3}, r"bad.jsonl:2: answer_prefix"),
    (read_longbench, {**_LB, "answers": "a", "dataset": "hotpotqa"}, r"bad.jsonl:2: answers"),
    (read_longbench, {**_LB, "answers": ["a"], "dataset": "trec"}, r"bad.jsonl:2: dataset.*one data"),
    (read_longbench, {**_LB, "answers": ["a"], "dataset": "lsht"}, r"bad.jsonl:2: dataset.*one of"),
    (read_ruler, {"index": 1, "input": "x"}, r"bad.jsonl:2: outputs: must be a non-empty list"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, reader, row, match):
    good = {read_jsonl: {"context": "c", "question": "q", "answer": "a"},
            read_longbench: {**_LB, "answers": ["a"], "dataset": "hotpotqa"},
            read_ruler: {"index": 0, "input": "x", "outputs": ["a"]}}[reader]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        reader(str(path))


def test_reader_errors_for_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_ruler(str(path))
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        get_task("jsonl:nope.jsonl")


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.slow
def test_full_cache_passes_passkey_on_the_embedded_model():
    from reference_impls.generation import run_sample
    from reference_impls.methods import make_method
    from reference_impls.models import load_model

    model, tok = load_model(dtype="bfloat16")
    task = TASKS["passkey"]
    scores = [task.score(run_sample(model, tok, make_method("full", 1), x["context"], x["question"], query_aware=True,
                                    max_new_tokens=task.max_new_tokens, answer_prefix=x["answer_prefix"])["answer"], x)
              for x in task.samples(5, 1500, seed=0, tokenizer=tok)]
    assert sum(scores) / len(scores) >= 0.6, scores
