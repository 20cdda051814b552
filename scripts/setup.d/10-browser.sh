#!/usr/bin/env bash
# Debian's Chromium and its matching chromedriver, for the chat page's browser tests (tests/web, marker
# `browser`, driven by Selenium with /usr/bin/chromedriver; no browser is ever downloaded). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver
chromium --version
