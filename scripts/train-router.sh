#!/usr/bin/env bash
# The pass-1 router with the `other` label (issue 15): the label policy on the route task (5 labels: the four
# areas and `other`, half TriviaQA questions and half chit-chat), resumable, best-of-validation on the whole
# val split. Then, before (the shipped router, trained without `other`) and after, on the whole route test
# split and on route_ood (500 NQ-open questions, a source training never saw, all `other`): pass-1 accuracy
# with confusion matrices, so route_ood's accuracy is the share of out-of-area prompts sent to the base
# model on purpose. Results: $RUN/ (checkpoint, log.csv, curve.svg, router.safetensors, store/) and
# $RUN/{before,after}.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
RUN=${RUN:-runs/router-other}
STEPS=${STEPS:-10}
MODEL_ID=SmolLM2-135M-Instruct
mkdir -p "$RUN"
nice -n 19 "$T2" train --task route --name router --category routing --lr 2e-2 --batch 16 \
  --steps "$STEPS" --eval-every 5 --val-limit 250 --seed 1 --expert-targets mlp --out "$RUN" \
  --experts-dir "$RUN/store" --resume
# The shipped store with this router in its place.
rm -rf "$RUN/eval-store"
mkdir -p "$RUN/eval-store"
cp -r "experts/$MODEL_ID" "$RUN/eval-store/"
cp "$RUN/store/$MODEL_ID/router.safetensors" "$RUN/eval-store/$MODEL_ID/router.safetensors"
for when in before after; do
  store=experts
  [ "$when" = after ] && store=$RUN/eval-store
  nice -n 19 "$T2" eval --experts-dir "$store" --task route --task route_ood --mode route \
    --adaptation route:prompt --adaptation route:classifier \
    --json "$RUN/$when.json" --markdown "$RUN/$when.md"
done
