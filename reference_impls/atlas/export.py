"""The atlas as one file: JSON (the entries as the schema defines them), CSV, or one BibTeX file.

Pure functions of a validated entry list (`reference_impls.atlas.validate.load_entries`); `kvatlas export`
writes their text to stdout or a file.

* JSON: `{"atlas_version", "kvatlas_version", "n_entries", "entries": [...]}`; each entry is the entry's
  fields exactly as `taxonomy/schema.json` defines them (unset fields as null), so the file validates against
  the schema entry by entry. `atlas_version` is `<kvatlas version>+<number of entries>` (`0.1.0+185`): two
  exports with the same version hold the same set of entries.
* CSV: two tables, because an entry has zero or more reported results. `to_csv` writes one row per entry
  (list fields joined with `;`, the BibTeX reduced to its key, the count of results); `to_results_csv`
  (`kvatlas export --format csv --results`) one row per reported result, led by its entry's id.
* BibTeX: every entry's BibTeX, sorted by entry id; keys are unique (the validator checks it, and so does
  this function, for entry lists that did not come from the validator).
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Iterable, Optional

from reference_impls.atlas.schema import Entry, Result

__all__ = ["to_json", "to_csv", "to_results_csv", "to_bibtex", "kvatlas_version", "ENTRY_COLUMNS",
           "RESULT_COLUMNS"]

# entry CSV: every schema field but the results (their own table) and the BibTeX (its key stands in)
ENTRY_COLUMNS = [f for f in Entry.model_fields if f not in ("reported_results", "bibtex")] + ["bibkey", "n_results"]
RESULT_COLUMNS = ["entry", "principle", "year"] + list(Result.model_fields)


def kvatlas_version() -> str:
    """The package version: the checkout's pyproject.toml when there is one, else the installed metadata."""
    from reference_impls.atlas.paths import project_root

    try:
        pyproject = project_root() / "pyproject.toml"
    except FileNotFoundError:
        pyproject = None
    if pyproject is not None and pyproject.is_file():
        # the [project] table's version line (a regex, not tomllib: the package supports Python 3.10)
        m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.M | re.S)
        if m:
            return m.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvatlas")
    except PackageNotFoundError:
        return "unknown"


def _sorted(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.id)


def to_json(entries: Iterable[Entry], version: Optional[str] = None) -> str:
    """The atlas as one JSON document; each item of `entries` validates against taxonomy/schema.json."""
    entries = _sorted(entries)
    version = version or kvatlas_version()
    doc = {"atlas_version": f"{version}+{len(entries)}", "kvatlas_version": version, "n_entries": len(entries),
           "entries": [e.model_dump(mode="json") for e in entries]}
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(map(str, value))
    return str(value)


def _table(columns: list[str], rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({c: _cell(row.get(c)) for c in columns})
    return buf.getvalue()


def to_csv(entries: Iterable[Entry]) -> str:
    """One row per entry, columns `ENTRY_COLUMNS`; list fields joined with ';', booleans as true/false."""
    return _table(ENTRY_COLUMNS, ({**dict(e), "bibkey": e.bibkey, "n_results": len(e.reported_results)}
                                  for e in _sorted(entries)))


def to_results_csv(entries: Iterable[Entry]) -> str:
    """One row per reported result, columns `RESULT_COLUMNS`: the entry's id, principle and year, then the result."""
    return _table(RESULT_COLUMNS, ({"entry": e.id, "principle": e.principle, "year": e.year, **dict(r)}
                                   for e in _sorted(entries) for r in e.reported_results))


def to_bibtex(entries: Iterable[Entry]) -> str:
    """Every entry's BibTeX, one blank line apart; raises ValueError if two entries share a key."""
    entries = _sorted(entries)
    seen: dict[str, str] = {}
    for e in entries:
        if e.bibkey in seen:
            raise ValueError(f"BibTeX key {e.bibkey!r} is used by both {seen[e.bibkey]!r} and {e.id!r}")
        seen[e.bibkey] = e.id
    return "\n".join(e.bibtex.strip() + "\n" for e in entries)
