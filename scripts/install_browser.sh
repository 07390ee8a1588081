#!/usr/bin/env bash
# Debian's chromium for the browser test (tests/test_site_browser.py drives it with Playwright); idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install_browser: chromium missing; run as root: apt-get install chromium" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
