"""The code the README and the docs show is the code in examples/, and it runs.

The README cannot include files (GitHub renders it as it is), so it carries copies, each under a marker
`<!-- example: examples/X -->`; this test fails when a copy and its file differ. The docs include the same
files with pymdownx.snippets, so they cannot differ.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- example: (\S+)[^>]*-->\n```\w*\n(.*?)```", re.S)


def test_readme_copies_equal_their_files():
    blocks = MARKED.findall((ROOT / "README.md").read_text())
    assert {path for path, _ in blocks} == {"examples/quickstart.py", "examples/cli.sh"}
    for path, code in blocks:
        assert code == (ROOT / path).read_text(), f"README.md's copy of {path} differs from the file: copy it again"


def test_docs_include_the_files():
    home = (ROOT / "docs" / "index.md").read_text()
    assert '--8<-- "examples/quickstart.py"' in home


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["KVATLAS_ROOT"] = str(ROOT)
    return env


@pytest.mark.slow
def test_quickstart_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    held, full = re.search(r"(\d+) bytes held vs (\d+) for the full cache", out.stdout).groups()
    assert 0 < int(held) < int(full)


@pytest.mark.slow
def test_cli_example_runs(tmp_path):
    bindir = str(Path(sys.executable).parent)
    env = _env()
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if not (Path(bindir) / "kvatlas").exists():  # run from a checkout without the entry point installed
        (tmp_path / "kvatlas").write_text(f"#!/bin/sh\nexec {sys.executable} -m reference_impls.cli \"$@\"\n")
        (tmp_path / "kvatlas").chmod(0o755)
        env["PATH"] = str(tmp_path) + os.pathsep + env["PATH"]
    out = subprocess.run(["bash", "-euo", "pipefail", str(ROOT / "examples" / "cli.sh")], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "@" in out.stdout and (tmp_path / "answers.jsonl").read_text().count("\n") == 2
