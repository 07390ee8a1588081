"""scripts/bench_decode_step.py: one layer's decoding step per method, timed part by part, runs end to end."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_it_times_every_part_of_every_method_and_reports_what_is_held():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decode_step.py"), "--methods", "full,h2o,adakv",
                          "--prompt", "64", "--steps", "3"], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert list(rows) == ["full", "h2o", "adakv"]
    for name, cells in rows.items():
        append, attention, after, total = map(float, cells[:4])
        assert min(append, attention, after) >= 0 and abs(append + attention + after - total) < 0.2, name
    assert rows["full"][4] == str(64 + 23)  # every token held: the prompt, the 20 warm-up steps and the 3 timed
    assert rows["h2o"][4] == str(16)  # 64 / 4, evicting while decoding
    assert int(rows["adakv"][4]) <= 3 * (16 + 23)  # its heads' kept tokens, held flat or padded, plus the decoded


@pytest.mark.slow
def test_in_model_it_times_each_store_where_the_model_calls_it():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decode_step.py"), "--model", "--methods",
                          "full,h2o", "--prompt", "300", "--steps", "2", "--dtype", "bfloat16"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: list(map(float, line.split()[1:])) for line in out.splitlines()[2:]}
    assert list(rows) == ["full", "h2o"] and all(len(r) == 3 and min(r) > 0 for r in rows.values())
    # the full cache's after_attention does nothing; H2O's scores, drops and gathers at every step of every layer
    assert rows["h2o"][1] > 5 * rows["full"][1]
