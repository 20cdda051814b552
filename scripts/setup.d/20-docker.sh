#!/usr/bin/env bash
# Brings up a Docker engine with compose v2 and buildx on a bare Debian bookworm machine, and the debootstrapped
# root file system the local stand-in base image builds from (docker/build-base.sh). Needs root.
# Idempotent: every step checks first, so a second run on the same machine takes a few seconds.
# Why it looks like this (no registry, no systemd, compose/buildx only in trixie): docs/docker.md.
#   --check: exit 0 when the engine answers with both plugins and the root file system is imported; 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOTFS_IMAGE=${ROOTFS_IMAGE:-sagemaker-llm-finetune-rootfs:bookworm}

ready() {
  docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1 \
    && docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1
}
if [ "${1:-}" = --check ]; then ready; exit; fi

log() { echo "[20-docker] $*"; }
timed() { local t0=$SECONDS; "$@"; log "$1 took $((SECONDS - t0)) s"; }

PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

install_engine() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then
    log "engine and debootstrap already installed"; return
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Wait for the dpkg lock rather than fail: other setup steps may be installing packages too.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
}

# Compose v2 and buildx are not packaged for bookworm; trixie's are static Go binaries that run here. Fetch
# the two .debs through a temporary source list so the machine's own apt configuration stays untouched.
install_cli_plugins() {
  if docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
    log "compose and buildx already installed"; return
  fi
  local tmp mirror
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$tmp/lists/partial" "$tmp/archives/partial" "$tmp/debs"
  chown _apt "$tmp/debs" 2>/dev/null || true  # apt downloads as its sandbox user _apt
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$tmp/trixie.list"
  local apt_opts=(-o "Dir::Etc::sourcelist=$tmp/trixie.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::archives=$tmp/archives" -o "APT::Get::List-Cleanup=0")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$tmp/debs" && apt-get "${apt_opts[@]}" download docker-compose docker-buildx)
  mkdir -p "$PLUGIN_DIR"
  for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$tmp/root"; done
  install -m 0755 "$tmp"/root/usr/libexec/docker/cli-plugins/docker-{compose,buildx} "$PLUGIN_DIR/"
  rm -rf "$tmp"
  docker compose version
  docker buildx version
}

start_engine() {
  if docker info >/dev/null 2>&1; then log "engine already running"; return; fi
  # No systemd here: run the daemon in its own session so it outlives this script (and the CI step).
  setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      log "engine up: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"
      return
    fi
    sleep 1
  done
  log "dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:"; tail -n 30 "$DOCKERD_LOG" >&2
  exit 1
}

timed install_engine
timed install_cli_plugins
timed start_engine
build_base() { bash docker/build-base.sh; }
timed build_base  # as root here, for its debootstrap step; setup-system.sh reruns it to keep the image current
