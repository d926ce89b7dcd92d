#!/usr/bin/env bash
# Issue 15: one trained expert file, evaluated once on every item of each task's whole test split under the
# task's fixed protocol (scripts/task-protocol.sh: the tasks' default answer budgets, ARC by
# log-likelihood), alone: base's per-item results on the same items are in eval/whole (greedy, so
# deterministic), and scripts/paired-table.py pairs the two (McNemar's exact test) and compares with the
# shipped expert of the file's name. Resumable by task; a task whose JSON exists is not run again.
# Usage: FILE=<run>/code.safetensors OUT=<run>/whole [TASKS="pyfunc arith ..."] bash scripts/eval-file-whole.sh
# An expert at a gated strength t runs as ADAPTATION="mix:code=t,base=1-t" (instead of FILE) with the run
# installed under that name in a scratch store (T2_EXPERTS=...).
# Results: $OUT/<task>.{json,md} and $OUT/README.md (the paired table).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/task-protocol.sh
T2=${T2:-target/release/t2}
ADAPTATION=${ADAPTATION:-file:${FILE:?FILE (the expert file) or ADAPTATION}}
OUT=${OUT:?OUT: where the results go}
WHOLE=${WHOLE:-experts/SmolLM2-135M-Instruct/eval/whole}
TASKS=${TASKS:-"arith pyfunc arc_easy sst2 arc_challenge"}
mkdir -p "$OUT"
for task in $TASKS; do
  [ -s "$OUT/$task.json" ] && { echo "== $task: done before"; continue; }
  echo "== $task ($(task_mode "$task"))"
  nice -n 19 "$T2" eval --task "$task" --mode "$(task_mode "$task")" --adaptation "$ADAPTATION" \
    --json "$OUT/$task.json.tmp" --markdown "$OUT/$task.md"
  mv "$OUT/$task.json.tmp" "$OUT/$task.json"
done
# shellcheck disable=SC2086
python3 scripts/paired-table.py "$OUT" "$WHOLE" $TASKS | tee "$OUT/README.md"
