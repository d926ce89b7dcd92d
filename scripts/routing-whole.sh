#!/usr/bin/env bash
# Issue 15's routing on the full mixed test set: pass 1 (the base model's own classification, `prompt`,
# and the classifier expert, `classifier`) labels every item of every area's whole test split
# (`t2 eval --mode route` on the areas' tasks records each item's label). A hard-routed answer is the
# chosen label's expert alone on that item (the base model for `other`), so the routed accuracy comes
# from scripts/eval-whole-splits.sh's per-item results of each expert on the same items, under each task's
# fixed protocol (ARC by log-likelihood included, which a generated routed answer could not follow).
# CHECK_TASK (default sst2) is also answered for real, routed in one pass by `t2 eval --adaptation
# route:classifier`, and compared item by item with the derived answers: the derivation is checked, not
# assumed. Results: $DIR/routing-whole.{json,md} and $DIR/routing-whole-table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
MODEL_DIR=experts/SmolLM2-135M-Instruct
DIR=${DIR:-$MODEL_DIR/eval/whole}
TASKS=${TASKS:-"arith pyfunc arc_easy sst2 arc_challenge"}
CHECK_TASK=${CHECK_TASK:-sst2}
TASK_ARGS=()
for t in $TASKS; do TASK_ARGS+=(--task "$t"); done
if [ ! -s "$DIR/routing-whole.json" ]; then
  nice -n 19 "$T2" eval "${TASK_ARGS[@]}" --mode route --adaptation route:prompt \
    --adaptation route:classifier --json "$DIR/routing-whole.json.tmp" --markdown "$DIR/routing-whole.md"
  mv "$DIR/routing-whole.json.tmp" "$DIR/routing-whole.json"
fi
if [ -n "$CHECK_TASK" ] && [ ! -s "$DIR/routing-check-$CHECK_TASK.json" ]; then
  nice -n 19 "$T2" eval --task "$CHECK_TASK" --adaptation route:classifier \
    --json "$DIR/routing-check-$CHECK_TASK.json.tmp" --markdown "$DIR/routing-check-$CHECK_TASK.md"
  mv "$DIR/routing-check-$CHECK_TASK.json.tmp" "$DIR/routing-check-$CHECK_TASK.json"
fi
python3 scripts/routing-whole-table.py "$DIR" "$MODEL_DIR/manifest.json" "$CHECK_TASK" $TASKS |
  tee "$DIR/routing-whole-table.md"
