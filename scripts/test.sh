#!/usr/bin/env bash
# The project's test command (README, CI): fetch the default model and the Python test clients if needed,
# run every Rust test, then the end-to-end suite against the real `t2 serve` (target/debug/t2, built by
# cargo test). The deployment tests also need Prometheus, HAProxy and the manifest validators
# (setup-deploy-tests.sh installs them); the Node SDK tests need node_modules (setup-node.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
bash scripts/fetch-data.sh
bash scripts/setup-python.sh
bash scripts/setup-node.sh
bash scripts/setup-deploy-tests.sh
cargo test --workspace --locked
T2_BIN="$PWD/target/debug/t2" .venv/bin/python -m pytest tests/e2e -q
