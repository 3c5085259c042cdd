#!/usr/bin/env bash
# Installs what the app and the tests need on a fresh Debian machine.
#   bash scripts/install.sh                 python packages only (enough for `python app.py`)
#   bash scripts/install.sh --with-browser  also Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--with-browser" ]] && ! command -v chromium >/dev/null 2>&1; then
  # Playwright drives Debian's chromium; `playwright install` would download a browser and fail offline.
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  # The emoji font lets screenshots show the verdict marks instead of empty boxes.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
fi

python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
