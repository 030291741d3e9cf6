#!/usr/bin/env bash
# Debian's Chromium for the JupyterLab UI test (Playwright drives it; its own browser download does not work offline).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then chromium --version; exit 0; fi
if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "chromium is missing and this user cannot install it; the browser test will be skipped"; exit 0; fi
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
chromium --version
