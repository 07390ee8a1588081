"""The atlas travels with the package: a wheel installed outside any checkout lists, cites and exports it.

Builds the wheel from a copy of the files a build needs (no network: the current environment's setuptools,
`--no-build-isolation`), installs it with `--no-deps` into a fresh venv that sees this environment's
packages through a .pth file (torch, pydantic, ... are not downloaded again), and runs `kvatlas` from an
empty folder with neither KVATLAS_ROOT nor PYTHONPATH set. About a minute on 2 cores.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "reference_impls", "taxonomy"]


def run(*cmd, cwd, env=None, timeout=300):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "Traceback" not in res.stderr, f"{cmd}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_an_installed_wheel_carries_the_atlas(tmp_path):
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:  # scripts/install.sh installs it
        pytest.skip("building without network needs setuptools>=77 here: pip install 'setuptools>=77'")
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    src.joinpath("reference_impls", "atlas", "data").mkdir(exist_ok=True)  # must not matter: the build fills it
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src,
        cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("kvatlas-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).stdout.strip())
    # this environment's packages, appended after the venv's own (a plain path: its .pth hooks, such as an
    # editable kvatlas install, are not run)
    (site / "outer-site-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KVATLAS_ROOT", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = run(py, "-c", "import reference_impls.atlas.paths as p; print(p.__file__); print(p.project_root())",
                cwd=empty, env=env).stdout.split()
    assert where[0].startswith(str(site)), where  # the installed copy, not a checkout
    assert where[1] == str(site / "reference_impls" / "atlas" / "data"), where

    n = len([p for p in (ROOT / "taxonomy").glob("*.yaml") if p.name != "vocabulary.yaml"])
    kvatlas = venv / "bin" / "kvatlas"
    res = run(kvatlas, "list", cwd=empty, env=env)
    assert len(res.stdout.strip().splitlines()) == n and f"{n} entries" in res.stderr
    assert run(kvatlas, "cite", "snapkv", cwd=empty, env=env).stdout.startswith("@")
    doc = json.loads(run(kvatlas, "export", "--format", "json", cwd=empty, env=env).stdout)
    assert doc["n_entries"] == n and re.fullmatch(r"\d+\.\d+\.\d+\S*\+\d+", doc["atlas_version"])
    assert "snapkv" in {e["id"] for e in doc["entries"]}
    res = run(kvatlas, "validate", cwd=empty, env=env)  # notebooks are not shipped: not reported missing
    assert f"{n} entries checked: {n} valid" in res.stderr
    assert not list(empty.iterdir()), "kvatlas wrote into the working folder"
