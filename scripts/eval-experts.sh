#!/usr/bin/env bash
# Evaluates the base model and every shipped expert on every area's held-out test set (a fixed-seed sample
# of LIMIT items each; the split files are in data/tasks), and the router on a sample of the routing test set by label
# log-likelihood. Results: experts/<model-id>/eval/<task>.{json,md} and the combined eval/README.md table.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
LIMIT=${LIMIT:-100}
DIR=${DIR:-experts/SmolLM2-135M-Instruct/eval}
mkdir -p "$DIR"
ADAPT=(--adaptation base --adaptation math --adaptation code --adaptation reasoning --adaptation sentiment)
# task max-new-tokens (the same answer lengths the experts were trained with)
for spec in "arith 24" "pyfunc 96" "arc_easy 12" "sst2 8"; do
  read -r task tokens <<<"$spec"
  echo "== $task"
  "$T2" eval --task "$task" "${ADAPT[@]}" --limit "$LIMIT" --max-new-tokens "$tokens" \
    --json "$DIR/$task.json" --markdown "$DIR/$task.md"
done
echo "== route"
"$T2" eval --task route --mode loglik --adaptation base --adaptation router --limit "$LIMIT" \
  --json "$DIR/route.json" --markdown "$DIR/route.md"
{
  echo "| task | area | split | adaptation | mode | n | accuracy | 95% CI |"
  echo "|---|---|---|---|---|---|---|---|"
  # Only each file's accuracy rows: the paired tests follow the first blank line.
  for task in arith pyfunc arc_easy sst2 route; do awk 'NR > 2 && /^$/ { exit } NR > 2' "$DIR/$task.md"; done
} >"$DIR/README.md"
cat "$DIR/README.md"
