#!/usr/bin/env bash
# The project's test command (README, CI): fetch the default model if needed, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
cargo test --workspace --locked
