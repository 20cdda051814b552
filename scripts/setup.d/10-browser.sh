#!/usr/bin/env bash
# Debian's Chromium and its matching chromedriver, for the chat page's browser tests (tests/web, marker
# `browser`, driven by Selenium with /usr/bin/chromedriver; no browser is ever downloaded). Needs root.
#   --check: exit 0 when both are installed, 1 otherwise; installs nothing.
set -euo pipefail
installed() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if [ "${1:-}" = --check ]; then installed; exit; fi
if installed; then
  echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver >/dev/null
chromium --version
