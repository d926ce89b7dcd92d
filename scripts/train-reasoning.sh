#!/usr/bin/env bash
# The reasoning expert with the label policy (issue 15): π over each ARC item's letters (3-5 options) as the
# reply's first token, REINFORCE with the mean-reward baseline, best-of-validation; then one evaluation on
# the whole arc_easy test split, base and expert under the same label protocol (`t2 eval --mode label`),
# with McNemar's exact test on the items where they disagree. Resumable: run it again and training picks up
# from its checkpoint (STEPS may be raised on resume; the other settings are the run's identity).
# Results: $RUN/ (checkpoint, log.csv, curve.svg, reasoning.safetensors) and $RUN/eval-test.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
RUN=${RUN:-runs/reasoning-label}
STEPS=${STEPS:-30}
LR=${LR:-1e-2}
mkdir -p "$RUN"
nice -n 19 "$T2" train --task arc_easy --name reasoning --category reasoning --rollouts label \
  --reward-baseline --lr "$LR" --batch 16 --steps "$STEPS" --eval-every 5 --val-limit 100 --seed 1 \
  --expert-targets mlp --out "$RUN" --no-install --resume
# The test split once, for the expert best-of-validation kept.
nice -n 19 "$T2" eval --task arc_easy --mode label --adaptation base \
  --adaptation "file:$RUN/reasoning.safetensors" --json "$RUN/eval-test.json" --markdown "$RUN/eval-test.md"
# The other areas (OTHERS=1; hours on two cores): the expert must not lose more than its interval there.
if [ "${OTHERS:-0}" = 1 ]; then
  for spec in "arith 24" "pyfunc 96" "sst2 8"; do
    read -r task tokens <<<"$spec"
    nice -n 19 "$T2" eval --task "$task" --adaptation base --adaptation "file:$RUN/reasoning.safetensors" \
      --max-new-tokens "$tokens" --json "$RUN/eval-test-$task.json" --markdown "$RUN/eval-test-$task.md"
  done
  nice -n 19 "$T2" eval --task arc_challenge --mode label --adaptation base \
    --adaptation "file:$RUN/reasoning.safetensors" --json "$RUN/eval-test-arc_challenge.json" \
    --markdown "$RUN/eval-test-arc_challenge.md"
fi
