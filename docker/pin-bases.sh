#!/usr/bin/env bash
# Pins the Dockerfiles' default base images by digest. For each `ARG BASE_IMAGE=<ref>` default it asks the
# registry for the digest of the ref's tag (the ref less any @sha256:...) and rewrites the default as
# `<tag>@sha256:<digest>`: the tag stays for the reader, the digest decides what is pulled. Nothing is pulled
# (`docker buildx imagetools inspect` reads the manifest only; the devel base is 13 GB).
#
#   docker/pin-bases.sh           resolve and rewrite; needs the registry (Docker Hub). Run it when moving to
#                                 a new base tag, or to take a rebuilt image of the same tag, and commit.
#   docker/pin-bases.sh --check   no network: exit 1, listing them, while a default is not pinned by digest.
#
# CI cannot reach a registry and builds on its local stand-in base instead (BASE_IMAGE=..., docker/build-base.sh),
# so these defaults matter for real builds: scripts/build-images.sh without --base, compose, plain docker build.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERFILES=(containers/train/Dockerfile containers/serve/Dockerfile local/Dockerfile)
DIGEST_RE='@sha256:[0-9a-f]{64}$'

default_of() { sed -nE 's/^ARG BASE_IMAGE=(.+)$/\1/p' "$1" | head -1; }

if [ "${1:-}" = --check ]; then
  unpinned=0
  for f in "${DOCKERFILES[@]}"; do
    ref=$(default_of "$f")
    if [[ $ref =~ $DIGEST_RE ]]; then
      echo "pinned    $f: $ref"
    else
      echo "UNPINNED  $f: $ref (run docker/pin-bases.sh where the registry is reachable)"
      unpinned=1
    fi
  done
  exit "$unpinned"
fi

for f in "${DOCKERFILES[@]}"; do
  ref=$(default_of "$f")
  tag=${ref%@sha256:*}
  digest=$(docker buildx imagetools inspect "$tag" | awk '$1 == "Digest:" {print $2; exit}')
  [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin-bases: no digest for $tag" >&2; exit 1; }
  sed -i -E "s|^ARG BASE_IMAGE=.+$|ARG BASE_IMAGE=$tag@$digest|" "$f"
  echo "$f: $tag@$digest"
done
