#!/usr/bin/env bash
# Installs the official Node SDK (pinned in tests/e2e/node/package-lock.json) for the end-to-end tests that
# use it as a client. Idempotent: returns at once when the pinned version is installed.
set -euo pipefail
cd "$(dirname "$0")/../tests/e2e/node"
want=$(node -p "require('./package-lock.json').packages['node_modules/openai'].version")
have=$(node -p "try { require('./node_modules/openai/package.json').version } catch { '' }")
if [ "$want" != "$have" ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
