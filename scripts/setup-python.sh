#!/usr/bin/env bash
# Creates .venv/ in the repository root (git-ignored) with the pinned Python packages that the end-to-end
# tests (tests/e2e) need. Idempotent: when the pinned versions are already installed it returns without
# starting pip, which alone takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=3.57.0
PYTEST_VERSION=9.2.0
# tests/e2e/test_schemathesis.py: the OpenAPI document against the live server.
SCHEMATHESIS_VERSION=4.32.5
VENV=.venv

# A venv whose interpreter no longer runs (Python upgraded or removed underneath it) is rebuilt from scratch.
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    python3 -m venv --clear "$VENV"
fi

installed_versions_match() {
    "$VENV/bin/python" - "$OPENAI_VERSION" "$PYTEST_VERSION" "$SCHEMATHESIS_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = (version("openai") == sys.argv[1] and version("pytest") == sys.argv[2]
          and version("schemathesis") == sys.argv[3])
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if ! installed_versions_match; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "openai==$OPENAI_VERSION" "pytest==$PYTEST_VERSION" "schemathesis==$SCHEMATHESIS_VERSION" >&2
    installed_versions_match || { echo "error: $VENV does not have openai $OPENAI_VERSION, pytest $PYTEST_VERSION and schemathesis $SCHEMATHESIS_VERSION after pip install" >&2; exit 1; }
fi

echo "python env ready: $VENV (openai $OPENAI_VERSION, pytest $PYTEST_VERSION, schemathesis $SCHEMATHESIS_VERSION)"
