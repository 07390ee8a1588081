"""Which tests a pull request runs: changed file names on stdin, test paths for pytest on stdout.

    git diff --name-only "$BASE"...HEAD | python scripts/pr_tests.py

The rules (CI runs them with `-m "not slow"`):
* always the fast atlas tests (`ATLAS_TESTS`);
* `reference_impls/<family>/<m>.py` -> `tests/<family>/test_<m>.py`; a file of the family without its own
  test (shared machinery such as `eviction/base.py`) -> the whole `tests/<family>/`;
* `taxonomy/<id>.yaml` and `notebooks/<m>.py` -> the tests of the method the entry links (`implementation`, `architecture`);
* a changed test file -> itself; a changed test helper or conftest -> its folder;
* a changed top-level module (`reference_impls/base.py`, `integration.py`, ...) or `pyproject.toml` ->
  every test (`tests`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
ATLAS_TESTS = ["tests/test_atlas.py", "tests/test_export.py", "tests/test_lineage.py", "tests/test_cli.py",
               "tests/test_taxonomy_coverage.py"]
EVERYTHING = {"pyproject.toml", "setup.py", "tests/conftest.py"}


def _method_tests(dotted: Optional[str], root: Path) -> list[str]:
    """`reference_impls.<family>.<module>.<Class>` -> its test file (the baseline's lives in test_integration)."""
    if not dotted:
        return []
    parts = dotted.split(".")
    if len(parts) < 4:
        return []
    return _module_tests(parts[1], parts[2], root)


def _module_tests(family: str, module: str, root: Path) -> list[str]:
    if family == "baseline":
        return ["tests/test_integration.py"]
    if family == "atlas":
        return []
    own = root / "tests" / family / f"test_{module}.py"
    if own.is_file():
        return [own.relative_to(root).as_posix()]
    folder = root / "tests" / family
    return [folder.relative_to(root).as_posix()] if folder.is_dir() else []


def _entry_field(path: Path, field: str) -> Optional[str]:
    """A field of an entry file, read without validating it (the PR may be fixing it); None if unreadable."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data.get(field) if isinstance(data, dict) else None


def tests_for(changed: Iterable[str], root: Path = ROOT) -> list[str]:
    out = list(ATLAS_TESTS)
    for name in (c.strip() for c in changed):
        p = Path(name)
        if not name:
            continue
        if name in EVERYTHING or (p.parts[0] == "reference_impls" and len(p.parts) == 2 and p.suffix == ".py"):
            return ["tests"]
        if p.parts[0] == "reference_impls" and len(p.parts) == 3 and p.suffix == ".py":
            out += _module_tests(p.parts[1], p.stem, root)
        elif p.parts[0] == "taxonomy" and p.suffix == ".yaml" and (root / p).is_file():
            for field in ("implementation", "architecture"):
                out += _method_tests(_entry_field(root / p, field), root)
        elif p.parts[0] == "notebooks" and p.suffix == ".py":
            for entry in sorted((root / "taxonomy").glob("*.yaml")):
                if _entry_field(entry, "notebook") == name:
                    for field in ("implementation", "architecture"):
                        out += _method_tests(_entry_field(entry, field), root)
        elif p.parts[0] == "tests" and (root / p).exists():
            is_test = p.name.startswith("test_") and p.suffix == ".py"
            out.append(p.as_posix() if is_test else p.parent.as_posix())
    seen: list[str] = []
    for t in out:
        if t not in seen and (root / t).exists():
            seen.append(t)
    # a folder already listed covers its files
    return [t for t in seen if not any(t != f and t.startswith(f + "/") for f in seen)]


if __name__ == "__main__":
    print("\n".join(tests_for(sys.stdin.read().splitlines())))
