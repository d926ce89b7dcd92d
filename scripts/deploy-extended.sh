#!/usr/bin/env bash
# The slow deployment checks that stay out of CI: renders deploy/grafana/dashboard.png from real traffic
# (t2 + Prometheus + scripts/loadgen.py, a few minutes on 2 cores). Needs target/debug/t2 (cargo build -p t2).
set -euo pipefail
cd "$(dirname "$0")/.."

MATPLOTLIB_VERSION=3.11.2
PYYAML_VERSION=6.0.3
VENV=.venv-extended

bash scripts/fetch-model.sh
bash scripts/setup-python.sh
bash scripts/setup-deploy-tests.sh
if ! "$VENV/bin/python" -c "import matplotlib, yaml, sys; sys.exit(matplotlib.__version__ != '$MATPLOTLIB_VERSION')" 2>/dev/null; then
    python3 -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "matplotlib==$MATPLOTLIB_VERSION" \
        "pyyaml==$PYYAML_VERSION" >&2
fi
"$VENV/bin/python" scripts/render_dashboard.py "$@"
