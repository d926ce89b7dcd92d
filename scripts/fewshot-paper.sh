#!/usr/bin/env bash
# Issue 15's few-shot at the paper's budget: CEM over the weights of every shipped expert (population 32,
# 6 elites, 50 iterations, 10 shots of the task's training split: 16,000 answers a task). The shots are
# scored under the task's own test protocol: ARC by the likelihood of its options (`t2 adapt
# --likelihood`, asked by its stem, as `t2 eval --mode loglik`), sst2 by generating its answer (32 tokens,
# cheap). The first sst2 run scored sst2 by likelihood too and chose a mix that generates worse than the
# sentiment expert alone (eval/attempts/fewshot-paper-sst2-likelihood).
# The search runs with the sparsity prior (`t2 adapt`'s default): the first population holds base and
# each expert alone, and among equal shot accuracy fewer experts rank first. The result is then chosen
# on HOLDOUT (below) more examples of the same split that the search never saw (`t2 adapt --holdout`, `--holdout-max`):
# among the search's best, its final mean, base and each expert alone, fewer experts winning a tie; on
# sst2 the search's best fitted all ten shots and lost to the sentiment expert on the test split.
# The hold-out was 20 for sst2 and arc_challenge (eval/fewshot-paper/README.md), then 80 (fixed before
# arc_easy's choice, from the power of a hold-out on sst2's training split: eval/fewshot-paper/
# sst2-holdout-power.md, 20 picks the better expert 87% of the time, 80 98%). 80 could not separate the
# contenders on arc_challenge, where four tied (eval/fewshot-pool2/), so the rule is now every example
# of the split the search did not see, up to 400 (eval/fewshot-guard2/RULE.md); HOLDOUT=N overrides it.
# Selection sees only the shots and the held-out examples, never the test split. The selections from
# each search evaluated, to show what each guard does:
#   chosen       the held-out choice: what `t2 adapt` stores as fewshot-<task>;
#   search best  the best candidate on the shots under the prior;
#   no prior     the best of the same evaluated candidates by shot accuracy then likelihood alone;
#   mean         the search's final mean α.
# Each is evaluated once on the task's whole test split under the task's fixed protocol, on the same
# items as scripts/eval-whole-splits.sh, and paired (McNemar's exact test) against base and against the
# best single expert there.
# Resumable: the search saves its state after every iteration (DIR/<task>.state.json, committed) and goes
# on from it; a task whose test JSON exists is skipped. Hours on two cores: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/task-protocol.sh
T2=${T2:-target/release/t2}
MODEL_DIR=experts/SmolLM2-135M-Instruct
DIR=${DIR:-$MODEL_DIR/eval/fewshot-paper}
WHOLE=${WHOLE:-$MODEL_DIR/eval/whole}
TASKS=${TASKS:-"arc_challenge arc_easy sst2"}
ITERATIONS=${ITERATIONS:-50}
SHOTS=10
HOLDOUT_CAP=400
mkdir -p "$DIR"
for task in $TASKS; do
  if [ -s "$DIR/$task.json" ]; then
    echo "== $task: done before ($DIR/$task.json)"
    continue
  fi
  mode=$(task_mode "$task")
  # `t2 adapt` knows which split the shots come from (train, else val) and holds out the rest of it.
  holdout=(--holdout-max "$HOLDOUT_CAP")
  [ -n "${HOLDOUT:-}" ] && holdout=(--holdout "$HOLDOUT")
  score=()
  [ "$mode" = loglik ] && score=(--likelihood)
  echo "== $task: search (shots scored by ${score[*]:-generation})"
  nice -n 19 "$T2" adapt --task "$task" "${score[@]}" --shots "$SHOTS" --population 32 --elites 6 \
    --iterations "$ITERATIONS" "${holdout[@]}" --name "fewshot-$task" \
    --state "$DIR/$task.state.json" --json "$DIR/$task.search.json"
  python3 - "$DIR/$task.search.json" > "$DIR/$task.selections.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
experts = s["config"]["experts"]

def mix(alpha):
    alpha = {e: min(max(a, 0.0), 1.0) for e, a in zip(experts, alpha)}
    if sum(alpha.values()) <= 1e-6:
        return "base"
    return "mix:" + ",".join(f"{e}={a:.6f}" for e, a in alpha.items() if a > 0)

history = s["outcome"]["history"]
pool = [c for h in history for c in h["population"]]
# Accuracy, then likelihood; the first drawn wins an exact tie, as in the search.
no_prior = max(enumerate(pool), key=lambda ic: (ic[1]["accuracy"], ic[1]["loglik"], -ic[0]))[1]
# The outcome's best is the held-out choice (what is stored); the search's own best is its last best_so_far.
json.dump({"chosen": mix(s["outcome"]["best"]["alpha"]), "search best": mix(history[-1]["best_so_far"]["alpha"]),
           "no prior": mix(no_prior["alpha"]), "mean": mix(history[-1]["mean"])}, sys.stdout, indent=1)
PYEOF
  mapfile -t adaptations < <(python3 -c 'import json, sys
seen = []
for a in json.load(open(sys.argv[1])).values():
    if a not in seen:
        seen.append(a)
print("\n".join(seen))' "$DIR/$task.selections.json")
  echo "== $task: test ($mode): $(tr -d '\n' < "$DIR/$task.selections.json")"
  nice -n 19 "$T2" eval --task "$task" --mode "$mode" "${adaptations[@]/#/--adaptation=}" \
    --json "$DIR/$task.json.tmp" --markdown "$DIR/$task.md"
  mv "$DIR/$task.json.tmp" "$DIR/$task.json"
done
python3 scripts/fewshot-table.py "$DIR" "$WHOLE" $TASKS | tee "$DIR/README.md"
