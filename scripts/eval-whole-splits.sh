#!/usr/bin/env bash
# Issue 15's evaluation: every area's whole test split (sst2 255, arc_easy 1,185, arc_challenge 1,172,
# arith 500, pyfunc 300), base and each final expert on the same items, under each task's fixed protocol:
# generation with the task's default answer budget (arith 96 tokens, pyfunc 192, sst2 32) and, for ARC,
# log-likelihood of each option's text as the reply to the question alone. Each expert is paired against
# base with McNemar's exact test (in each task's .md). Resumable by task: a task whose JSON exists is
# skipped, so rerunning after a stop goes on with the next one. Hours on two cores (run it in the
# background, nice 19).
# Results: $DIR/<task>.{json,md} and $DIR/README.md (all accuracy rows, then all paired tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/task-protocol.sh
T2=${T2:-target/release/t2}
MODEL_DIR=experts/SmolLM2-135M-Instruct
DIR=${DIR:-$MODEL_DIR/eval/whole}
# The shipped math (math-kl at strength 0.75 since 2026-12-07; the rows before came from math-long).
MATH=${MATH:-math}
REASONING=${REASONING:-file:$MODEL_DIR/training/reasoning-stem/reasoning.safetensors}
TASKS=${TASKS:-"sst2 arith arc_easy arc_challenge pyfunc"}
mkdir -p "$DIR"
ADAPT=(--adaptation base --adaptation "$MATH" --adaptation code --adaptation "$REASONING"
  --adaptation sentiment)
for task in $TASKS; do
  if [ -s "$DIR/$task.json" ]; then
    echo "== $task: done before ($DIR/$task.json)"
    continue
  fi
  mode=$(task_mode "$task")
  echo "== $task ($mode)"
  nice -n 19 "$T2" eval --task "$task" --mode "$mode" "${ADAPT[@]}" \
    --json "$DIR/$task.json.tmp" --markdown "$DIR/$task.md"
  mv "$DIR/$task.json.tmp" "$DIR/$task.json"
done
{
  echo "| task | area | split | adaptation | mode | n | accuracy | 95% CI |"
  echo "|---|---|---|---|---|---|---|---|"
  for task in $TASKS; do [ -s "$DIR/$task.md" ] && awk 'NR > 2 && /^$/ { exit } NR > 2' "$DIR/$task.md"; done
  echo
  echo "Paired against base on the same items (McNemar's exact test on the items where they disagree):"
  echo
  echo "| task | adaptation | mode | n | base only right | only it right | p (two-sided) |"
  echo "|---|---|---|---|---|---|---|"
  for task in $TASKS; do [ -s "$DIR/$task.md" ] && awk '/^Paired/ { p = 1; next } p && /^\| [a-z0-9_]+ \| / && !/^\| task/' "$DIR/$task.md"; done
} >"$DIR/README.md"
cat "$DIR/README.md"
