"""scripts/pr_tests.py: a pull request's changed files map to the tests CI runs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pr_tests", ROOT / "scripts" / "pr_tests.py")
pr_tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pr_tests)
ATLAS = pr_tests.ATLAS_TESTS


def test_each_kind_of_change_maps_to_its_tests():
    t = pr_tests.tests_for
    assert t([]) == ATLAS
    assert t(["reference_impls/eviction/snapkv.py"]) == ATLAS + ["tests/eviction/test_snapkv.py"]
    assert t(["taxonomy/snapkv.yaml"]) == ATLAS + ["tests/eviction/test_snapkv.py"]  # via `implementation`
    assert t(["taxonomy/kivi.yaml", "notebooks/h2o.py"]) == ATLAS + ["tests/quantization/test_kivi.py",
                                                                      "tests/eviction/test_h2o.py"]
    assert t(["taxonomy/mamba.yaml"]) == ATLAS + ["tests/architectures/test_mamba.py"]  # via `architecture`
    assert t(["taxonomy/full.yaml"]) == ATLAS + ["tests/test_integration.py"]
    assert t(["reference_impls/quantization/kivi_triton.py"]) == ATLAS + ["tests/quantization/test_kivi_triton.py"]
    # shared machinery of a family: the family's tests; a test helper: its folder, which covers its files
    assert t(["reference_impls/eviction/base.py", "tests/eviction/test_h2o.py"]) == ATLAS + ["tests/eviction"]
    assert t(["tests/quantization/quant_checks.py"]) == ATLAS + ["tests/quantization"]
    # entries without an implementation, deleted files, docs: only the atlas tests
    assert t(["taxonomy/hymba.yaml", "taxonomy/gone.yaml", "README.md", "taxonomy/vocabulary.yaml"]) == ATLAS
    # the shared core and the build: everything
    assert t(["reference_impls/integration.py"]) == ["tests"]
    assert t(["README.md", "pyproject.toml"]) == ["tests"]


def test_the_script_reads_stdin_and_prints_one_path_a_line():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "pr_tests.py")], input="taxonomy/snapkv.yaml\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.splitlines() == ATLAS + ["tests/eviction/test_snapkv.py"]
