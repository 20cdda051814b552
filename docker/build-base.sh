#!/usr/bin/env bash
# Builds the local stand-in base image (Debian bookworm + Python 3.11 + this machine's CA bundle) for machines
# with no container registry: debootstrap a minimal rootfs, `docker import` it, then docker/base/Dockerfile.
# Skips whatever is already built for the same inputs (keyed by a label), so re-running is cheap.
#   usage: docker/build-base.sh            env: BASE_IMAGE (tag to build), CA_BUNDLE, DEBIAN_MIRROR
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-sagemaker-llm-finetune-base:bookworm}
ROOTFS_IMAGE=${ROOTFS_IMAGE:-sagemaker-llm-finetune-rootfs:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
fi
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { echo "[build-base] $*"; }

if docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
  log "rootfs $ROOTFS_IMAGE exists"
else
  t0=$SECONDS
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
  # Leave apt's lists out of the image (they are stale anyway by the time anything builds on it).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | docker import - "$ROOTFS_IMAGE" >/dev/null
  log "rootfs $ROOTFS_IMAGE imported in $((SECONDS - t0)) s"
fi

key=$( (cat docker/base/Dockerfile "$CA_BUNDLE"; docker image inspect -f '{{.Id}}' "$ROOTFS_IMAGE") | sha256sum | cut -c1-16)
have=$(docker image inspect -f '{{index .Config.Labels "org.sagemaker-llm-finetune.base-key"}}' "$BASE_IMAGE" 2>/dev/null || true)
if [ "$have" = "$key" ]; then
  log "$BASE_IMAGE is up to date ($key)"; exit 0
fi

t0=$SECONDS
ctx=$(mktemp -d)
trap 'rm -rf "$ctx" "${rootfs:-}"' EXIT
cp docker/base/Dockerfile "$ctx/"
cp "$CA_BUNDLE" "$ctx/host-ca-bundle.crt"
DOCKER_BUILDKIT=1 docker build -q --build-arg ROOTFS_IMAGE="$ROOTFS_IMAGE" \
  --label "org.sagemaker-llm-finetune.base-key=$key" -t "$BASE_IMAGE" "$ctx" >/dev/null
log "$BASE_IMAGE built in $((SECONDS - t0)) s: $(docker run --rm "$BASE_IMAGE" python --version)"
