"""scripts/decode_checksum.py: the fingerprint a "same logits" claim is checked with is itself deterministic, and
tells methods apart."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@functools.cache  # each distinct run once per session: every run loads the model in a fresh process
def run(*extra):
    cmd = [sys.executable, str(ROOT / "scripts" / "decode_checksum.py"), "--methods", "full,streamingllm",
           "--dtypes", "bfloat16", "--length", "300", "--tokens", "4", *extra]
    return tuple(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines())


@pytest.mark.slow
def test_two_runs_print_the_same_fingerprints_and_methods_differ():
    first, second = run(), run("--grad-mode", "inference_mode")  # the default mode, in a second process
    assert first == second and len(first) == 2
    (dtype, name, *_), (_, other, *_) = (line.split() for line in first)
    assert (dtype, name, other) == ("bfloat16", "full", "streamingllm")
    assert first[0].split(" ", 2)[2] != first[1].split(" ", 2)[2]  # a 4x cache is not the full one


@pytest.mark.slow
def test_inference_mode_decodes_bit_for_bit_as_no_grad():
    # greedy_generate and the speed scripts decode under torch.inference_mode for its lower per-op cost; that is
    # only allowed because it runs the same kernels: the fingerprints must not move
    assert run("--grad-mode", "no_grad") == run()
