"""Load and validate taxonomy entries; every problem becomes one `file:line: field: message` line.

Checks: YAML syntax, the schema (types, required fields, vocabularies with their allowed values, arXiv id
format, BibTeX shape, a reported result or a `no_results_reason`), id equal to the file name, duplicate ids /
arXiv ids / BibTeX keys, and that every `builds_on` / `compared_with` id, `implementation` dotted path and
`notebook` file exists.

Warnings (`load_entries(..., warnings=True)`; printed by `kvatlas validate`, which still exits 0) flag what
a reviewer should look at but the schema cannot require: a result read from a table or figure without the
`paper_version` it was read from (tables change between arXiv versions).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from reference_impls.atlas.paths import is_packaged, project_root, taxonomy_dir
from reference_impls.atlas.schema import VOCAB, Entry, Result

__all__ = ["Problem", "load_entries", "validate_paths", "entry_files"]

_NOT_ENTRIES = {"vocabulary.yaml", "schema.json"}
_FROM_TABLE = re.compile(r"(?i)^(table|figure|fig\.)")
_RULE_FIELD = {"no_results": ("reported_results",), "needs_notebook": ("notebook",)}  # schema.py's entry rules
_VOCAB_FIELDS = {"principle", "also", "dimensions", "training", "phase", "granularity", "budget_policy",
                 "benchmark_category"}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str
    level: str = "error"  # or "warning": shown by `kvatlas validate`, never fails it

    def __str__(self) -> str:
        tag = "warning: " if self.level == "warning" else ""
        return f"{self.file}:{self.line}: {self.field}: {tag}{self.message}"


def entry_files(folder: Optional[Path] = None) -> list[Path]:
    folder = folder or taxonomy_dir()
    return sorted(p for p in folder.glob("*.yaml") if p.name not in _NOT_ENTRIES)


def _line_of(node: Optional[yaml.Node], loc: tuple) -> int:
    """1-based line of the YAML node at path `loc` (keys and list indices), or of its nearest parent."""
    line = 1 if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                return line
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _message(err: dict[str, Any]) -> str:
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "literal_error" and field in _VOCAB_FIELDS:
        key = "principle" if field == "also" else field
        return f"{err['input']!r} is not allowed; allowed values: {', '.join(VOCAB[key])}"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "extra_forbidden":
        model = Result if field == "reported_results" and len(err["loc"]) > 2 else Entry
        return f"unknown field (allowed fields: {', '.join(model.model_fields)})"
    if err["type"] == "string_pattern_mismatch" and field == "arxiv":
        return f"{err['input']!r} is not an arXiv id like \"2402.02750\" (quote it in YAML)"
    if err["type"] == "string_pattern_mismatch" and field == "id":
        return f"{err['input']!r} is not a slug: lowercase letters, digits and '-', at least 2 characters"
    if err["type"] == "string_pattern_mismatch" and field == "doi":
        return f"{err['input']!r} is not a DOI like \"10.18653/v1/2024.findings-emnlp.266\" (no https://doi.org/ prefix)"
    last = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "string_pattern_mismatch" and last == "paper_version":
        return f"{err['input']!r} is not an arXiv version: allowed values look like 'v1', 'v2', ... (quote it in YAML)"
    if err["type"] == "string_pattern_mismatch" and last == "source":
        return (f"{err['input']!r} does not say where in the paper: it must start with Table, Figure, Fig., Section "
                "or Abstract (String should match pattern)")
    if last == "kv_fraction" and err["type"] in ("greater_than", "less_than_equal", "float_type", "float_parsing"):
        return (f"{err['input']!r} is not a fraction in (0, 1]: KV bytes held / a 16-bit full cache's bytes "
                "(0.25 = 4x smaller; 2-bit KV = 0.125)")
    if err["type"] in _RULE_FIELD:
        return err["msg"]
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg} (got {err['input']!r})" if err["type"].endswith("_type") else msg


def _load_one(path: Path, shown: str) -> tuple[Optional[Entry], Optional[yaml.Node], list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return None, None, [Problem(shown, 1, "file", f"cannot read: {err}")]
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        return None, None, [Problem(shown, line, "yaml", f"invalid YAML: {getattr(err, 'problem', err)}")]
    if not isinstance(data, dict):
        return None, node, [Problem(shown, 1, "entry", "the file must hold a mapping of fields")]
    try:
        entry = Entry.model_validate(data)
    except ValidationError as err:
        probs = []
        for e in err.errors():
            # rules checked on the whole entry have no location: report them on the field to fill in
            loc = _RULE_FIELD.get(e["type"], tuple(e["loc"]))
            if len(loc) > 1 and loc[-1] in ("float", "int"):  # a number field's union members: one problem
                loc = loc[:-1]
                if e["type"] == "int_type" or e["type"] == "int_parsing":
                    continue
            field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
            probs.append(Problem(shown, _line_of(node, loc), field or "entry", _message(e)))
        return None, node, probs
    probs = []
    if entry.id != path.stem:
        probs.append(Problem(shown, _line_of(node, ("id",)), "id", f"{entry.id!r} must equal the file name {path.stem!r}"))
    return entry, node, probs


def _shown(path: Path) -> str:
    """The path as the user would type it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _exists_dotted(path: str) -> bool:
    """Does the module file exist and define (or import) the name? Read with `ast`, without importing torch."""
    module, _, attr = path.rpartition(".")
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        return False
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*module.split(".")[1:])
    file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return attr in names


def load_entries(paths: Iterable[Path] | None = None, *, check_links: bool = True,
                 known_ids: Optional[set[str]] = None, warnings: bool = False) -> tuple[list[Entry], list[Problem]]:
    """Validate the given files (default: all of taxonomy/). Returns (valid entries, problems).

    With `warnings=True` the problems also hold warning-level ones (`level == "warning"`), after the errors.
    """
    paths = list(paths) if paths is not None else entry_files()
    root, packaged = project_root(), is_packaged()  # an installed wheel carries the taxonomy, not the notebooks
    entries, nodes, problems = [], {}, []
    for p in paths:
        shown = _shown(Path(p))
        entry, node, probs = _load_one(Path(p), shown)
        problems += probs
        if entry is not None and not probs:
            entries.append((shown, entry))
            nodes[shown] = node
    # duplicates: across the files validated together, and against the rest of taxonomy/
    given = {Path(p).resolve() for p in paths}
    others = []
    for p in entry_files():
        if p.resolve() not in given:
            e, _, probs = _load_one(p, str(p))
            if e is not None:
                others.append((str(p), e))
    for attr, label in (("id", "id"), ("arxiv", "arXiv id"), ("bibkey", "BibTeX key")):
        first: dict[str, str] = {getattr(e, attr): shown for shown, e in others if getattr(e, attr) is not None}
        for shown, e in entries:
            value = getattr(e, attr)
            if value is None:
                continue
            if value in first:
                field = "bibtex" if attr == "bibkey" else attr
                problems.append(Problem(shown, _line_of(nodes[shown], (field,)), field,
                                        f"duplicate {label} {value!r} (also in {first[value]})"))
            else:
                first[value] = shown
    if check_links:
        ids = (known_ids or set()) | {p.stem for p in entry_files()} | {e.id for _, e in entries}
        for shown, e in entries:
            for field in ("builds_on", "compared_with"):
                for i, ref in enumerate(getattr(e, field)):
                    if ref not in ids:
                        problems.append(Problem(shown, _line_of(nodes[shown], (field, i)), f"{field}[{i}]",
                                                f"no taxonomy entry with id {ref!r}"))
            if e.implementation and not _exists_dotted(e.implementation):
                problems.append(Problem(shown, _line_of(nodes[shown], ("implementation",)), "implementation",
                                        f"{e.implementation!r} cannot be imported"))
            if e.architecture and not _exists_dotted(e.architecture):
                problems.append(Problem(shown, _line_of(nodes[shown], ("architecture",)), "architecture",
                                        f"{e.architecture!r} cannot be imported"))
            if e.notebook and not packaged and not (root / e.notebook).is_file():
                problems.append(Problem(shown, _line_of(nodes[shown], ("notebook",)), "notebook",
                                        f"{e.notebook!r} does not exist"))
    if warnings:
        for shown, e in entries:
            for i, r in enumerate(e.reported_results):
                if _FROM_TABLE.match(r.source) and r.paper_version is None:
                    problems.append(Problem(shown, _line_of(nodes[shown], ("reported_results", i, "source")),
                                            f"reported_results[{i}].paper_version",
                                            f"{r.source!r} can change between arXiv versions: state the version the "
                                            "number was read from (paper_version: v1, v2, ...)", level="warning"))
    return [e for _, e in entries], problems


def validate_paths(paths: Iterable[Path] | None = None) -> list[Problem]:
    return load_entries(paths)[1]
