#!/usr/bin/env bash
# Wheels for a lent GPU machine that reaches no package index: what the training and serving code needs beyond
# the machine's own image (Python 3.12 with torch, accelerate, safetensors, tokenizers, pandas, numpy, ...; see the
# device tool's KINDS.md), pinned as in containers/*/requirements.txt. Writes them to DIR (default .whl, which
# .gitignore keeps out of commits); on the machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# DeepSpeed publishes a source distribution only: its wheel is built here (pure Python; its ops compile on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
mkdir -p "$out"
pin() { grep -h "^$1==" containers/train/requirements.txt containers/serve/requirements.txt | head -1; }
PY=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "$@"
}
download "$(pin transformers)" "$(pin peft)" "$(pin trl)" "$(pin datasets)" "$(pin flask)" "$(pin gunicorn)" \
  "$(pin pydantic)" "pydantic-core==$("$PY" -c "import pydantic_core; print(pydantic_core.__version__)")" annotated-types typing-inspection blinker itsdangerous \
  dill multiprocess hjson
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$(pin deepspeed)"
du -sh "$out"
