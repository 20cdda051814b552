#!/usr/bin/env bash
# Debian's docker-registry: a real registry on loopback for the push-images test (tests/aws/test_push_images.py;
# no registry is reachable from here). The package's own service is not wanted: the test starts one on a free
# port, and there is no systemd to start it anyway. Needs root.
#   --check: exit 0 when installed, 1 otherwise; installs nothing.
set -euo pipefail
installed() { command -v docker-registry >/dev/null || command -v registry >/dev/null; }
if [ "${1:-}" = --check ]; then installed; exit; fi
if installed; then echo "docker-registry already installed"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker-registry >/dev/null
echo "installed $(docker-registry --version 2>/dev/null || echo docker-registry)"
