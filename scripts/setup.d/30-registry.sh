#!/usr/bin/env bash
# What tests/aws needs beyond `make venv`, on a bare Debian bookworm machine (CI runs this as root):
#  - Debian's docker-registry: a real registry on loopback for the push-images test (no registry is reachable).
#  - The AWS commands' venv (.local/venv-aws, from scripts/requirements.txt) and the IaC linters' venv
#    (.local/venv-infra-lint, from infra/requirements-lint.txt). Each is separate from .venv because the
#    sagemaker SDK (mlflow -> gunicorn < 27) and checkov (boto3 1.35) pin versions the main venv is past.
#    scripts/llmft-aws and infra/lint.sh would make them on first use; doing it here keeps it out of test time.
# Idempotent: each step checks first (the venvs by a hash of their requirements file).
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { echo "[30-aws] $*"; }

if command -v docker-registry >/dev/null || command -v registry >/dev/null; then
  log "docker-registry already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # The package's service is not wanted (the test starts its own on a free port); there is no systemd to start it.
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker-registry >/dev/null
  log "installed $(docker-registry --version 2>/dev/null || echo docker-registry)"
fi

t0=$SECONDS
scripts/llmft-aws --help >/dev/null
log "AWS commands' venv ready ($((SECONDS - t0)) s)"

t0=$SECONDS
infra/lint.sh >/dev/null || { log "infra/lint.sh reported findings (the test will show them)"; }
log "IaC linters' venv ready ($((SECONDS - t0)) s)"
