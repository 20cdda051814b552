#!/usr/bin/env bash
# The system packages the whole test suite needs beyond `make venv`; `make test` runs this before the suite.
#   scripts/setup.d/10-browser.sh   Debian's Chromium + chromedriver        (browser tier)
#   scripts/setup.d/20-docker.sh    Docker engine, compose v2, buildx, and the stand-in base's rootfs (docker tier)
#   scripts/setup.d/30-registry.sh  Debian's docker-registry                 (the ECR push test)
# Each script checks first (`--check`), so on a machine that has everything this takes seconds and needs no
# root. What is missing is installed as root: directly when run as root, through `sudo -n` when that works
# without a password; otherwise it stops at once and says what to run. Then, as the calling user, the stand-in
# base image is brought up to date (docker/build-base.sh; cheap when current).
# Local opt-out: SKIP_DOCKER_TESTS=1 installs nothing (ignored when CI=true, where every tier must run).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*"; }

if [ "${SKIP_DOCKER_TESTS:-}" = 1 ] && [ "${CI:-}" != true ]; then
  log "SKIP_DOCKER_TESTS=1: no system set-up; the Docker tier is skipped, and the browser tier where Chromium is missing"
  exit 0
fi

missing=()
for script in scripts/setup.d/*.sh; do
  bash "$script" --check >/dev/null 2>&1 || missing+=("$script")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    {
      echo "make test needs system packages this machine lacks; install them once, as root:"
      echo
      echo "    sudo scripts/setup-system.sh"
      echo
      echo "missing: ${missing[*]}"
      echo "(or skip the Docker tier locally, never in CI: SKIP_DOCKER_TESTS=1 make test)"
    } >&2
    exit 1
  fi
  for script in "${missing[@]}"; do
    t0=$SECONDS
    log "$script ..."
    "${as_root[@]}" bash "$script"
    log "$script took $((SECONDS - t0)) s"
  done
fi

# The stand-in base image the project's images build FROM where no registry is reachable; keyed by content.
if docker info >/dev/null 2>&1; then
  bash docker/build-base.sh
fi
log "system packages in place ($SECONDS s)"
