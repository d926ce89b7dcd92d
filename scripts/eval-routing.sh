#!/usr/bin/env bash
# Transformer²'s two passes, measured on held-out and unseen tasks (a fixed-seed sample of LIMIT test items
# each, the same items as scripts/eval-experts.sh):
#   1. routing accuracy of pass 1 (prompt and classifier) on the routing test set, with confusion matrices;
#   2. answers routed by pass 1 (prompt, classifier) on the held-out tasks; base and the oracle expert come
#      from eval-experts.sh's runs on the same items;
#   3. few-shot CEM mixes (`t2 adapt`, shots from the training split, or validation when a task has none; never test) and their test accuracy;
#   4. the unseen task arc_challenge (no expert trained on it): base, every expert, routing, few-shot.
# Results: experts/<model-id>/eval/{routing,<task>-routed,fewshot-<task>,<task>-fewshot,arc_challenge}.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
LIMIT=${LIMIT:-100}
DIR=${DIR:-experts/SmolLM2-135M-Instruct/eval}
# Few-shot search budget (the paper: 10 shots, population 32, 6 elites, ~50 iterations; reduced to fit CPUs).
SHOTS=${SHOTS:-6}
POP=${POP:-12}
ELITES=${ELITES:-3}
ITERS=${ITERS:-3}
# The unseen task gets the paper's population and 10 shots (its val split), the held-out ones the small budget.
UNSEEN_SHOTS=${UNSEEN_SHOTS:-10}
UNSEEN_POP=${UNSEEN_POP:-32}
UNSEEN_ELITES=${UNSEEN_ELITES:-6}
UNSEEN_ITERS=${UNSEEN_ITERS:-5}
FEWSHOT_TASKS=${FEWSHOT_TASKS:-"arith pyfunc arc_easy sst2 arc_challenge"}
mkdir -p "$DIR"
ROUTES=(--adaptation route:prompt --adaptation route:classifier)
tokens_of() { case "$1" in arith) echo 24 ;; pyfunc) echo 96 ;; sst2) echo 8 ;; *) echo 12 ;; esac; }

# SKIP_TO_FEWSHOT=1 resumes a run at step 3.
if [ -z "${SKIP_TO_FEWSHOT:-}" ]; then
  echo "== routing accuracy"
  "$T2" eval --task route --mode route "${ROUTES[@]}" --limit "$LIMIT" \
    --json "$DIR/routing.json" --markdown "$DIR/routing.md"

  for task in arith pyfunc arc_easy sst2; do
    echo "== $task, routed"
    "$T2" eval --task "$task" "${ROUTES[@]}" --limit "$LIMIT" --max-new-tokens "$(tokens_of "$task")" \
      --json "$DIR/$task-routed.json" --markdown "$DIR/$task-routed.md"
  done
fi

for task in $FEWSHOT_TASKS; do
  budget=(--shots "$SHOTS" --population "$POP" --elites "$ELITES" --iterations "$ITERS")
  if [ "$task" = arc_challenge ]; then
    budget=(--shots "$UNSEEN_SHOTS" --population "$UNSEEN_POP" --elites "$UNSEEN_ELITES" --iterations "$UNSEEN_ITERS")
  fi
  echo "== few-shot search on $task (${budget[*]}; never from the test split)"
  "$T2" adapt --task "$task" "${budget[@]}" \
    --max-new-tokens "$(tokens_of "$task")" --name "fewshot-$task" --json "$DIR/fewshot-$task.json"
  "$T2" eval --task "$task" --adaptation "fewshot-$task" --limit "$LIMIT" \
    --max-new-tokens "$(tokens_of "$task")" --json "$DIR/$task-fewshot.json" --markdown "$DIR/$task-fewshot.md"
done

if [ -z "${SKIP_UNSEEN:-}" ]; then
  echo "== unseen: arc_challenge, every expert and both routers"
  "$T2" eval --task arc_challenge --adaptation base --adaptation math --adaptation code --adaptation reasoning \
    --adaptation sentiment "${ROUTES[@]}" --limit "$LIMIT" --max-new-tokens 12 \
    --json "$DIR/arc_challenge.json" --markdown "$DIR/arc_challenge.md"
fi
