#!/usr/bin/env bash
# What the deployment tests (tests/e2e/test_deploy_*.py) need besides .venv: Prometheus (with promtool) and
# HAProxy from Debian's packages, pinned PyPI validators in .venv (PyYAML, jsonschema, kubernetes-validate)
# and checkov in its own .venv-checkov (its many pinned dependencies stay out of the test clients' env).
# Idempotent: returns at once when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYYAML_VERSION=6.0.3
JSONSCHEMA_VERSION=4.26.0
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
VENV=.venv
CHECKOV_VENV=.venv-checkov

missing_debs=()
command -v prometheus >/dev/null || missing_debs+=(prometheus)
command -v promtool >/dev/null || missing_debs+=(prometheus)
command -v haproxy >/dev/null || missing_debs+=(haproxy)
if ((${#missing_debs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: the deployment tests need: ${missing_debs[*]} (apt-get install -y --no-install-recommends ${missing_debs[*]})" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # The packages' own services are not wanted: the tests start their own processes on free ports.
    apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >&2
fi

versions_match() {
    "$1/bin/python" - "${@:2}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = all(version(name) == want for name, want in zip(sys.argv[1::2], sys.argv[2::2]))
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

pins=(pyyaml "$PYYAML_VERSION" jsonschema "$JSONSCHEMA_VERSION" kubernetes-validate "$KUBERNETES_VALIDATE_VERSION")
if ! versions_match "$VENV" "${pins[@]}"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pyyaml==$PYYAML_VERSION" \
        "jsonschema==$JSONSCHEMA_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
    versions_match "$VENV" "${pins[@]}" || { echo "error: $VENV lacks the pinned validators after pip install" >&2; exit 1; }
fi

if ! "$CHECKOV_VENV/bin/python" -c '' 2>/dev/null; then
    python3 -m venv --clear "$CHECKOV_VENV"
fi
if ! versions_match "$CHECKOV_VENV" checkov "$CHECKOV_VERSION"; then
    "$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2
    versions_match "$CHECKOV_VENV" checkov "$CHECKOV_VERSION" || { echo "error: $CHECKOV_VENV lacks checkov $CHECKOV_VERSION" >&2; exit 1; }
fi

echo "deploy test tools ready: $(prometheus --version 2>&1 | head -1); $(haproxy -v | head -1); kubernetes-validate $KUBERNETES_VALIDATE_VERSION; checkov $CHECKOV_VERSION"
