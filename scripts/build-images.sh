#!/usr/bin/env bash
# Builds the training and serving images from the repo root, once per content: each image carries a label
# with a hash of everything its build reads (Dockerfile, its own folder, the build helper, the wheels, the
# base image), and an image whose label already matches is not rebuilt at all.
#
#   scripts/build-images.sh [--base IMAGE] [--wheels DIR] [--extra-ca FILE] [--tag TAG] [train] [serve]
#
#   --base IMAGE     BASE_IMAGE build arg for both images (default: the Dockerfiles' public PyTorch bases;
#                    CI: the local stand-in from docker/build-base.sh). Env: BASE_IMAGE.
#   --wheels DIR     copy DIR/torch-*.whl into wheelhouse/ first, so the build installs that torch (e.g. the
#                    CPU wheel) when the base has none. Env: WHEEL_DIR. (wheelhouse/llama_cpp_python-*.whl,
#                    which `make venv` builds, goes into the serving image: its llama.cpp engine.)
#   --extra-ca FILE  extra CA bundle for a TLS-intercepting proxy, passed as BuildKit secret `extra_ca`.
#   --tag TAG        image tag (default: local). Images: sagemaker-llm-finetune-{train,serve}:TAG.
# Prints the built image names, one a line, last.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-}
WHEEL_DIR=${WHEEL_DIR:-}
EXTRA_CA=${EXTRA_CA:-}
TAG=${IMAGE_TAG:-local}
PREFIX=${IMAGE_PREFIX:-sagemaker-llm-finetune}
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --base) BASE_IMAGE=$2; shift 2 ;;
    --wheels) WHEEL_DIR=$2; shift 2 ;;
    --extra-ca) EXTRA_CA=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    train|serve) targets+=("$1"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(train serve)

log() { echo "[build-images] $*" >&2; }

if [ -n "$WHEEL_DIR" ]; then
  mkdir -p wheelhouse
  for whl in "$WHEEL_DIR"/torch-*.whl; do
    [ -e "$whl" ] || { echo "build-images: no torch-*.whl in $WHEEL_DIR" >&2; exit 2; }
    dest=wheelhouse/$(basename "$whl")
    # Hard link when on the same filesystem (free), else copy once.
    [ -e "$dest" ] || ln "$whl" "$dest" 2>/dev/null || cp "$whl" "$dest"
  done
fi

# Everything one image's build reads, hashed: the same inputs give the same key, and the image is reused.
content_key() {
  local name=$1 base_id=""
  if [ -n "$BASE_IMAGE" ]; then base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo "$BASE_IMAGE"); fi
  {
    echo "base=$BASE_IMAGE@$base_id"
    find "containers/$name" .dockerignore docker/pip-install.sh docker/install_gguf_converter.py -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    # Wheels are big: their names and sizes stand for their content.
    find wheelhouse -maxdepth 1 -name '*.whl' -printf '%f %s\n' 2>/dev/null | sort
  } | sha256sum | cut -c1-16
}

built=()
for name in "${targets[@]}"; do
  image="$PREFIX-$name:$TAG"
  key=$(content_key "$name")
  have=$(docker image inspect -f '{{index .Config.Labels "org.sagemaker-llm-finetune.content-key"}}' "$image" 2>/dev/null || true)
  if [ "$have" = "$key" ]; then
    log "$image is up to date (content key $key)"
  else
    args=(-f "containers/$name/Dockerfile" -t "$image" --label "org.sagemaker-llm-finetune.content-key=$key")
    [ -z "$BASE_IMAGE" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ -z "$EXTRA_CA" ] || args+=(--secret "id=extra_ca,src=$EXTRA_CA")
    mkdir -p wheelhouse  # the Dockerfiles bind-mount it; empty is fine
    t0=$SECONDS
    log "building $image (base ${BASE_IMAGE:-Dockerfile default}, content key $key)"
    DOCKER_BUILDKIT=1 docker build --progress=plain "${args[@]}" . >&2
    log "built $image in $((SECONDS - t0)) s, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec) uncompressed"
  fi
  built+=("$image")
done
printf '%s\n' "${built[@]}"
