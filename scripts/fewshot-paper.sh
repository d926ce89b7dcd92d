#!/usr/bin/env bash
# Issue 15's few-shot at the paper's budget: CEM over the weights of every shipped expert (population 32,
# 6 elites, 50 iterations, 10 shots of the task's training split: 16,000 answers a task), each shot scored
# by the likelihood of its options (`t2 adapt --likelihood`; ARC asked by its stem, as `t2 eval --mode
# loglik`). Selection sees only the shots. Two ways to pick the final mix from a search, both evaluated:
#   best  the best candidate ever scored (accuracy on the shots, ties broken by the mean log-likelihood of
#         the right option): what `t2 adapt` stores as fewshot-<task>;
#   mean  the search's final mean α, a guard against a candidate that won its tie by noise.
# Each is then evaluated once on the task's whole test split under the task's fixed protocol (ARC by
# log-likelihood, sst2 by generation), on the same items as scripts/eval-whole-splits.sh, and paired
# (McNemar's exact test) against base and against the best single expert there.
# Resumable: the search saves its state after every iteration (DIR/<task>.state.json, small, committed)
# and goes on from it; a task whose test JSON exists is skipped. Hours on two cores: run in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
MODEL_DIR=experts/SmolLM2-135M-Instruct
DIR=${DIR:-$MODEL_DIR/eval/fewshot-paper}
WHOLE=${WHOLE:-$MODEL_DIR/eval/whole}
TASKS=${TASKS:-"arc_challenge arc_easy sst2"}
ITERATIONS=${ITERATIONS:-50}
mkdir -p "$DIR"
for task in $TASKS; do
  if [ -s "$DIR/$task.json" ]; then
    echo "== $task: done before ($DIR/$task.json)"
    continue
  fi
  echo "== $task: search"
  nice -n 19 "$T2" adapt --task "$task" --likelihood --shots 10 --population 32 --elites 6 \
    --iterations "$ITERATIONS" --name "fewshot-$task" --state "$DIR/$task.state.json" \
    --json "$DIR/$task.search.json"
  mean=$(python3 - "$DIR/$task.search.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
experts, mean = s["config"]["experts"], s["outcome"]["history"][-1]["mean"]
alpha = {e: min(max(a, 0.0), 1.0) for e, a in zip(experts, mean)}
print("mix:" + ",".join(f"{e}={a:.6f}" for e, a in alpha.items() if a > 0) if sum(alpha.values()) > 1e-6 else "base")
PYEOF
)
  case $task in
    arc_easy | arc_challenge) mode=loglik ;;
    *) mode=generate ;;
  esac
  echo "== $task: test ($mode), best = fewshot-$task, mean = $mean"
  nice -n 19 "$T2" eval --task "$task" --mode "$mode" --adaptation "fewshot-$task" \
    --adaptation "$mean" --json "$DIR/$task.json.tmp" --markdown "$DIR/$task.md"
  mv "$DIR/$task.json.tmp" "$DIR/$task.json"
done
python3 scripts/fewshot-table.py "$DIR" "$WHOLE" $TASKS | tee "$DIR/README.md"
