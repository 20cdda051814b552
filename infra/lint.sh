#!/usr/bin/env bash
# Lints the CloudFormation template with cfn-lint (AWS's schema and best-practice rules) and checkov (security
# policies). Both live in their own venv, .local/venv-infra-lint, made on first use from
# infra/requirements-lint.txt: checkov pins boto3 1.35, which the project's venvs are well past.
#   infra/lint.sh [TEMPLATE]      exit 0 clean, 1 findings, 2 set-up problem
#   infra/lint.sh --install-only  make the venv and stop (what `make test` does before the suite)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEMPLATE=${1:-$ROOT/infra/template.yaml}
VENV=${LLMFT_INFRA_LINT_VENV:-$ROOT/.local/venv-infra-lint}
REQS=$ROOT/infra/requirements-lint.txt
STAMP=$VENV/.requirements.sha256
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/checkov" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[infra/lint] installing $REQS into $VENV (once)" >&2
  "${PYTHON:-python3}" -m venv "$VENV" || exit 2
  "$VENV/bin/python" -m pip install -q -r "$REQS" >&2 || exit 2
  echo "$want" >"$STAMP"
fi
[ "$TEMPLATE" = --install-only ] && exit 0
status=0
echo "::: cfn-lint $TEMPLATE"
"$VENV/bin/cfn-lint" "$TEMPLATE" || status=1
echo "::: checkov $TEMPLATE"
# Offline: no Bridgecrew platform, no version check, no download of external checks.
BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false "$VENV/bin/checkov" --quiet --compact --skip-download \
  --framework cloudformation --file "$TEMPLATE" || status=1
exit $status
