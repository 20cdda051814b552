#!/bin/sh
# `pip install` as the images' Dockerfiles run it: no cache left in the layer, and an optional extra CA
# (corporate TLS proxy) taken from the BuildKit secret `extra_ca`, so it is trusted for this build step
# only and never written into a layer:
#   docker build --secret id=extra_ca,src=/path/to/corp-ca.pem ...
# Bind-mounted into each RUN that installs packages (never copied into an image).
#
#   pip-install.sh --require-hashes -r LOCK     the images' dependencies, from their hashed lock (make lock)
#   pip-install.sh --check-lock REQS LOCK       installs nothing: fails unless every `name==version` pin of
#                                               REQS is an entry of LOCK, i.e. LOCK was regenerated after
#                                               REQS last changed (a stale lock stops the build here, by name)
set -eu
if [ "${1:-}" = --check-lock ]; then
  reqs=$2 lock=$3
  # The pins of REQS without comments, markers or blanks; each must open an entry of LOCK, which
  # `uv pip compile` writes as `name==version \` (names lower-case, so compare case-insensitively).
  missing=$(sed -e 's/#.*//' -e 's/;.*//' -e 's/[[:space:]]//g' "$reqs" | grep '==' | while read -r pin; do
    grep -qixF "$pin \\" "$lock" || echo "$pin"
  done)
  if [ -n "$missing" ]; then
    echo "pip-install.sh: $lock does not lock these pins of $reqs:" $missing >&2
    echo "pip-install.sh: regenerate the locks with \`make lock\` and commit them" >&2
    exit 1
  fi
  echo "pip-install.sh: $lock covers every pin of $reqs"
  exit 0
fi
if [ -s /run/secrets/extra_ca ]; then
  trusted=${PIP_CERT:-$(python -c 'import pip._vendor.certifi as c; print(c.where())')}
  bundle=$(mktemp)
  trap 'rm -f "$bundle"' EXIT
  cat "$trusted" /run/secrets/extra_ca >"$bundle"
  export PIP_CERT="$bundle" REQUESTS_CA_BUNDLE="$bundle" SSL_CERT_FILE="$bundle"
fi
python -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off "$@"
