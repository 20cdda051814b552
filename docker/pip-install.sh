#!/bin/sh
# `pip install` as the images' Dockerfiles run it: no cache left in the layer, and an optional extra CA
# (corporate TLS proxy) taken from the BuildKit secret `extra_ca`, so it is trusted for this build step
# only and never written into a layer:
#   docker build --secret id=extra_ca,src=/path/to/corp-ca.pem ...
# Bind-mounted into each RUN that installs packages (never copied into an image).
set -eu
if [ -s /run/secrets/extra_ca ]; then
  trusted=${PIP_CERT:-$(python -c 'import pip._vendor.certifi as c; print(c.where())')}
  bundle=$(mktemp)
  trap 'rm -f "$bundle"' EXIT
  cat "$trusted" /run/secrets/extra_ca >"$bundle"
  export PIP_CERT="$bundle" REQUESTS_CA_BUNDLE="$bundle" SSL_CERT_FILE="$bundle"
fi
python -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off "$@"
