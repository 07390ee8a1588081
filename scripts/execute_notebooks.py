"""Execute the notebooks whose inputs changed; keep their outputs, checked in, in notebooks/executed/.

    python scripts/execute_notebooks.py              # execute every stale notebook (none stale: does nothing)
    python scripts/execute_notebooks.py kivi h2o     # only these, if stale; --force: even if up to date
    python scripts/execute_notebooks.py --check      # exit 1 if one is stale, missing, unclean or quotes by hand
    python scripts/execute_notebooks.py --list       # one line per notebook: up to date / stale / missing

The site renders `notebooks/executed/<name>.ipynb` as it is: `make site` on a fresh clone executes nothing
while every notebook is up to date. An executed notebook is up to date when its key still matches. The key
is a SHA-256 over the notebook's source and over every file of this repository that its kernel imported or
opened while it ran (the `reference_impls` modules it uses, the `results/` files it reads); that list is
recorded in the executed notebook's metadata (`metadata.kvatlas.inputs`), so a change to any of those files
makes exactly the notebooks that used it stale. Outside the key: the installed packages and the embedded
model's weights (pinned by pyproject.toml / scripts/install.sh) and the machine's timings.

Why not jupyter-cache: its key covers a notebook's code cells and kernelspec only, so a change to the package
code or to a results file a notebook reads would not re-execute it; and its store is a SQLite database,
which cannot be reviewed or merged in git. The pieces used here are the Jupyter project's own: jupytext reads
the percent-format source, nbclient executes it in an IPython kernel, nbformat writes the result.

Clean outputs are enforced, not hoped for: an executed notebook is rejected (and --check fails) if a cell
wrote to stderr, printed a warning or a progress bar, or shows a path of the machine that built it. Numbers
quoted in the prose's "paper vs here" tables (the column headed "here") must be printed or computed by a cell
(see `unverified_prose_numbers`); --check fails on one that is not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks"
EXECUTED = SOURCES / "executed"
CELL_TIMEOUT_S = 1800

# Runs in the kernel before the notebook's first cell (and is removed from the result): records every file
# under the repository that is opened (imports read their source through the same audit event).
_PREAMBLE = """\
import os as _kv_os, sys as _kv_sys
_kv_opened = set()
def _kv_audit(event, args, _root={root!r}):
    if event == "open" and isinstance(args[0], (str, bytes, _kv_os.PathLike)):
        path = _kv_os.path.realpath(_kv_os.fsdecode(args[0]))
        if path.startswith(_root + _kv_os.sep) and _kv_os.path.isfile(path):
            _kv_opened.add(path[len(_root) + 1:])
_kv_sys.addaudithook(_kv_audit)
"""
# Runs after the last cell (and is removed): prints the recorded inputs, the loaded modules' files included.
_POSTAMBLE = """\
for _kv_m in list(_kv_sys.modules.values()):
    _kv_f = getattr(_kv_m, "__file__", None)
    if _kv_f:
        _kv_audit("open", (_kv_f,))
print("KVATLAS-INPUTS " + __import__("json").dumps(sorted(_kv_opened)))
"""
_IGNORED_INPUTS = re.compile(r"^(notebooks/executed/|\.|.*__pycache__/|.*\.pyc$)")

# What a clean output must not contain.
_UNCLEAN = [
    (re.compile(r"\b\w*Warning\b|\bwarnings\.warn\b"), "a warning"),
    (re.compile(r"\d+%\|[^\n]*\||\d+it/s\]|\bit/s\]|Loading weights|Loading checkpoint"), "a progress bar"),
    (re.compile(r"site-packages|dist-packages|/home/|/root/|/tmp/|/work/|/usr/(lib|local)/|[A-Z]:\\\\Users"),
     "a path of the machine that built it"),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_of(name: str) -> Path:
    return SOURCES / f"{name}.py"


def executed_of(name: str) -> Path:
    return EXECUTED / f"{name}.ipynb"


def all_names() -> list[str]:
    return sorted(p.stem for p in SOURCES.glob("*.py"))


def key_of(name: str, inputs: list[str]) -> str | None:
    """The key over the notebook's source and its recorded inputs; None if one of them no longer exists."""
    h = hashlib.sha256()
    for rel in [f"notebooks/{name}.py", *sorted(set(inputs) - {f'notebooks/{name}.py'})]:
        path = ROOT / rel
        if not path.is_file():
            return None
        h.update(f"{rel}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def read_meta(name: str) -> dict | None:
    path = executed_of(name)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get("kvatlas")


def state(name: str) -> str:
    """'up to date', 'stale' or 'missing'."""
    meta = read_meta(name)
    if not meta:
        return "missing"
    return "up to date" if key_of(name, meta.get("inputs", [])) == meta.get("key") else "stale"


def problems(nb) -> list[str]:
    """Why an executed notebook's outputs are not clean (empty list: clean)."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found.append(f"cell {i}: writes to stderr: {out.get('text', '')[:200]!r}")
                continue
            if out.get("output_type") == "error":
                found.append(f"cell {i}: raised {out.get('ename')}")
                continue
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items()
                                              if k.startswith("text/") and isinstance(v, str)]
            for text in texts:
                for rx, what in _UNCLEAN:
                    m = rx.search(text if isinstance(text, str) else "".join(text))
                    if m:
                        found.append(f"cell {i}: shows {what}: ...{m.group(0)!r}...")
    return found


_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:/(\d+))?")


def _numbers(text: str) -> list[tuple[str, float, int]]:
    """(token, value, decimals) of each number in the text: 1,004 -> 1004; 30/30 stays one token."""
    out = []
    for m in _NUMBER.finditer(text):
        whole = m.group(1).replace(",", "")
        if m.group(3):
            out.append((f"{whole}/{m.group(3)}", float("nan"), 0))
        else:
            out.append((m.group(0).replace(",", ""), float(f"{whole}.{m.group(2) or 0}"), len(m.group(2) or "")))
    return out


def unverified_prose_numbers(nb) -> list[str]:
    """Numbers quoted in a Markdown table's "here" column that no cell computes.

    A quoted number counts as computed when a cell's output or code shows it, exactly or rounded to the
    quoted decimals (a percentage also as a fraction): 0.81 is backed by a printed 0.8134, 42.7% by 0.427,
    and 29/30 by a printed accuracy 0.97 beside n = 30.
    """
    shown = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        shown += _numbers(cell.source)
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items()
                                              if k in ("text/plain", "text/html", "text/markdown")]
            for t in texts:
                shown += _numbers(t if isinstance(t, str) else "".join(t))
    tokens = {t for t, _, _ in shown}
    values = [v for _, v, _ in shown if v == v]

    def backed(token: str, value: float, decimals: int, percent: bool) -> bool:
        if token in tokens:
            return True
        if value != value:  # a/b, e.g. 29/30: backed by a printed fraction a/b (to 2 decimals) and a printed b
            a, b = (int(x) for x in token.split("/"))
            return b > 0 and str(b) in tokens and any(round(v, 2) == round(a / b, 2) for v in values)
        scale = [1, 100] if percent else [1]
        return any(round(v * k, decimals) == value for v in values for k in scale)

    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        col = None
        for line in cell.source.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
            if cells is None:
                col = None
                continue
            if col is None:
                col = next((j for j, c in enumerate(cells) if c.lower().startswith("here")), None)
                continue
            if set("".join(cells)) <= set("-: ") or col >= len(cells):
                continue
            text = cells[col]
            for m, (token, value, decimals) in zip(_NUMBER.finditer(text), _numbers(text)):
                percent = text[m.end():m.end() + 1] == "%"
                if not backed(token, value, decimals, percent):
                    found.append(f"cell {i}: the 'here' column quotes {m.group(0)}{'%' if percent else ''}, "
                                 f"which no cell prints or computes")
    return found


def execute(name: str) -> float:
    """Execute notebooks/<name>.py in a fresh kernel; write notebooks/executed/<name>.ipynb; return seconds."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    src = source_of(name)
    nb = jupytext.read(src)
    nb.metadata.pop("jupytext", None)
    pre = nbformat.v4.new_code_cell(_PREAMBLE.format(root=str(ROOT.resolve())))
    post = nbformat.v4.new_code_cell(_POSTAMBLE)
    nb.cells = [pre, *nb.cells, post]
    t0 = time.perf_counter()
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                            record_timing=False, resources={"metadata": {"path": str(ROOT)}},
                            extra_arguments=["--log-level=ERROR"])  # not the kernel's "TCP without encryption"
    client.execute()
    seconds = time.perf_counter() - t0
    post_out = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "stream")
    inputs = json.loads(post_out.split("KVATLAS-INPUTS ", 1)[1].strip())
    nb.cells = nb.cells[1:-1]
    for cell in nb.cells:  # number the cells from 1 again, as a reader who ran them would see
        if cell.cell_type == "code":
            cell.metadata.pop("execution", None)
            if cell.get("execution_count"):
                cell.execution_count -= 1
            for out in cell.get("outputs", []):
                if out.get("execution_count"):
                    out["execution_count"] -= 1
    inputs = sorted(p for p in inputs if not _IGNORED_INPUTS.match(p) and p != f"notebooks/{name}.py")
    nb.metadata["kvatlas"] = {"source": f"notebooks/{name}.py", "key": key_of(name, inputs), "inputs": inputs}
    bad = problems(nb)
    if bad and not os.environ.get("KVATLAS_KEEP_UNCLEAN"):
        raise SystemExit(f"{name}: outputs are not clean:\n  " + "\n  ".join(bad))
    EXECUTED.mkdir(exist_ok=True)
    nbformat.write(nb, executed_of(name))
    for p in unverified_prose_numbers(nb):  # written all the same; --check (CI) fails until the prose is fixed
        print(f"\n  notebooks/{name}.py: {p}", end="")
    return seconds


def prepare_model() -> None:
    """Convert the embedded model's GGUF file once, here, so that no notebook shows the conversion's progress."""
    from reference_impls.models import _converted_dir, load_model

    if not (_converted_dir() / "config.json").is_file():
        print("converting the embedded model once (~1 minute) ...", flush=True)
        load_model()


def check(names: list[str]) -> int:
    import nbformat

    bad = []
    for name in names:
        s = state(name)
        if s != "up to date":
            bad.append(f"notebooks/executed/{name}.ipynb: {s} (run `make notebooks`)")
            continue
        nb = nbformat.read(executed_of(name), 4)
        bad += [f"notebooks/executed/{name}.ipynb: {p}" for p in problems(nb) + unverified_prose_numbers(nb)]
    orphans = sorted(set(p.stem for p in EXECUTED.glob("*.ipynb")) - set(all_names()))
    bad += [f"notebooks/executed/{o}.ipynb: its source notebooks/{o}.py is gone" for o in orphans]
    for line in bad:
        print(line)
    print(f"execute_notebooks --check: {len(names)} notebooks, {len(bad)} problems", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook names (default: all)")
    ap.add_argument("--check", action="store_true", help="only check: exit 1 if any is stale, missing or unclean")
    ap.add_argument("--list", action="store_true", help="print each notebook's state")
    ap.add_argument("--force", action="store_true", help="execute even if up to date")
    args = ap.parse_args(argv)
    names = args.names or all_names()
    unknown = [n for n in names if not source_of(n).is_file()]
    if unknown:
        ap.error(f"no notebooks/{unknown[0]}.py")
    if args.check:
        return check(names)
    if args.list:
        for n in names:
            print(f"{n:20s} {state(n)}")
        return 0
    # the kernels import this checkout's package, whatever is installed, so that its files are in the key
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("KVATLAS_ROOT", str(ROOT))
    todo = [n for n in names if args.force or state(n) != "up to date"]
    print(f"notebooks: {len(names) - len(todo)} up to date, {len(todo)} to execute", flush=True)
    if todo:
        prepare_model()
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] executing notebooks/{name}.py ...", end=" ", flush=True)
        print(f"{execute(name):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
