"""The site's build machinery, without building: the executed-notebook cache's key and checks, and the
built-site checks of scripts/check_site.py, on small made-up inputs (fast)."""

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


xn = _load("execute_notebooks")
cs = _load("check_site")


def notebook(markdown, code_outputs):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(markdown))
    for source, text in code_outputs:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells.append(cell)
    return nb


TABLE = "| | paper | here (SmolLM2) |\n|---|---|---|\n| accuracy | 95% | {here} |\n"


@pytest.mark.parametrize("here, ok", [
    ("30/30 passkeys at 4.0x, top share 0.81", True),     # 1.00 and 30 printed; 4.0 from 3.97; 0.81 from 0.8134
    ("29/30 passkeys", False),                           # 0.97 never printed
    ("a share of 42.7%", False),
    ("1,004 tokens", True),
])
def test_prose_numbers_must_be_printed(here, ok):
    nb = notebook(TABLE.format(here=here), [("x = 1", "accuracy 1.00 n 30 ratio 3.97 share 0.8134 tokens 1004\n")])
    assert (xn.unverified_prose_numbers(nb) == []) == ok


def test_only_the_here_column_is_checked():
    nb = notebook("| | paper 12.5% | here |\n|---|---|---|\n| a | 99.9 | nothing quoted |\n", [("", "")])
    assert xn.unverified_prose_numbers(nb) == []


@pytest.mark.parametrize("text, what", [
    ("/home/me/.venv/lib/python3.11/site-packages/tqdm/auto.py:21", "path"),
    ("Loading weights: 100%|██████████| 272/272 [00:00<00:00, 3.2it/s]", "progress bar"),
    ("UserWarning: something", "warning"),
])
def test_unclean_outputs_are_found(text, what):
    nb = notebook("# t", [("", text)])
    assert any(what in p for p in xn.problems(nb))


def test_stderr_is_unclean():
    nb = notebook("# t", [])
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="hello")]
    nb.cells.append(cell)
    assert xn.problems(nb) and xn.problems(notebook("# t", [("", "fine: 0.81\n")])) == []


def test_a_changed_input_makes_exactly_its_notebooks_stale(tmp_path, monkeypatch):
    for d in ("notebooks/executed", "pkg", "results"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "notebooks" / "a.py").write_text("# a")
    (tmp_path / "notebooks" / "b.py").write_text("# b")
    (tmp_path / "pkg" / "m.py").write_text("x = 1")
    (tmp_path / "results" / "r.json").write_text("{}")
    monkeypatch.setattr(xn, "ROOT", tmp_path)
    monkeypatch.setattr(xn, "SOURCES", tmp_path / "notebooks")
    monkeypatch.setattr(xn, "EXECUTED", tmp_path / "notebooks" / "executed")
    for name, inputs in (("a", ["pkg/m.py", "results/r.json"]), ("b", ["pkg/m.py"])):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kvatlas"] = {"key": xn.key_of(name, inputs), "inputs": inputs}
        nbformat.write(nb, xn.executed_of(name))
    assert [xn.state(n) for n in "ab"] == ["up to date", "up to date"]
    (tmp_path / "results" / "r.json").write_text('{"changed": 1}')
    assert [xn.state(n) for n in "ab"] == ["stale", "up to date"]
    (tmp_path / "notebooks" / "b.py").write_text("# b, edited")
    assert xn.state("b") == "stale"
    (tmp_path / "pkg" / "m.py").unlink()
    assert xn.state("a") == "stale"


def test_check_site_finds_broken_links_and_missing_pages(tmp_path):
    site = tmp_path / "site"
    (site / "a").mkdir(parents=True)
    (site / "index.html").write_text('<a href="a/">a</a> <a href="a/#x">x</a> <a href="b/">b</a>'
                                     '<a href="https://example.org/">ok</a>')
    (site / "a" / "index.html").write_text('<h2 id="y">y</h2>')
    (site / "404.html").write_text('<a href="/a/">a</a>')
    (site / "pages.json").write_text(json.dumps({"entries": 1, "pages": ["index.md", "a.md", "c.md"]}))
    pages = sorted(site.rglob("*.html"))
    links = cs.check_links(site, pages)
    assert links == ["index.html: no #x on a/index.html", "index.html: broken link b/"]
    assert cs.check_pages(site, pages) == ["missing page: c/index.html"]
    assert cs.main(str(site)) == 1
