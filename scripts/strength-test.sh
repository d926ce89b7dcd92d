#!/usr/bin/env bash
# Issue 15: the strengths chosen on validation by scripts/strength-sweep.sh ($DIR/choice.md), evaluated
# once on every area's whole test split under each task's fixed protocol, and paired (McNemar's exact test)
# against base and against the expert at full strength on the same items (scripts/eval-whole-splits.sh's
# results, which are deterministic: greedy answers, the same items). An expert whose chosen strength is 1
# is the shipped one and is not evaluated again. Resumable by task. Results: $DIR/test/<task>.{json,md},
# $DIR/test/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/task-protocol.sh
T2=${T2:-target/release/t2}
MODEL_DIR=experts/SmolLM2-135M-Instruct
DIR=${DIR:-$MODEL_DIR/eval/strength}
WHOLE=${WHOLE:-$MODEL_DIR/eval/whole}
TASKS=${TASKS:-"arith pyfunc arc_easy sst2 arc_challenge"}
mkdir -p "$DIR/test"
mapfile -t chosen < <(sed -n 's/^\([a-z_]*\): chosen strength \([0-9.]*\) *$/\1 \2/p' "$DIR/choice.md")
ADAPT=()
for line in "${chosen[@]}"; do
  read -r expert t <<<"$line"
  [ "$t" = "1.0" ] || [ "$t" = "1" ] && continue
  ADAPT+=(--adaptation "$(python3 -c 'import sys; t = float(sys.argv[2]); print(f"mix:{sys.argv[1]}={t:g},base={1 - t:g}")' "$expert" "$t")")
done
if [ ${#ADAPT[@]} -eq 0 ]; then
  echo "no expert needs another strength: nothing to evaluate"
  exit 0
fi
for task in $TASKS; do
  [ -s "$DIR/test/$task.json" ] && { echo "== $task: done before"; continue; }
  mode=$(task_mode "$task")
  echo "== $task ($mode): ${ADAPT[*]}"
  nice -n 19 "$T2" eval --task "$task" --mode "$mode" "${ADAPT[@]}" \
    --json "$DIR/test/$task.json.tmp" --markdown "$DIR/test/$task.md"
  mv "$DIR/test/$task.json.tmp" "$DIR/test/$task.json"
done
python3 scripts/paired-table.py "$DIR/test" "$WHOLE" $TASKS | tee "$DIR/test/README.md"
