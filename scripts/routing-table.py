#!/usr/bin/env python3
"""The two-pass results table from the eval JSON files (scripts/eval-experts.sh and scripts/eval-routing.sh):
per task, base vs prompt routing vs classifier routing vs few-shot vs the oracle expert (the expert of the
task's own area; on the unseen task, the best single expert), accuracy with 95% Wilson intervals, and the
share of the oracle's gain that routing keeps."""

import json
import os
import sys

DIR = sys.argv[1] if len(sys.argv) > 1 else "experts/SmolLM2-135M-Instruct/eval"
ORACLE = {"arith": "math", "pyfunc": "code", "arc_easy": "reasoning", "sst2": "sentiment"}


def load(name):
    path = os.path.join(DIR, name)
    return {r["adaptation"]: r for r in json.load(open(path))} if os.path.exists(path) else {}


def cell(r):
    if r is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['accuracy']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def share(routed, base, oracle):
    gain = oracle["accuracy"] - base["accuracy"]
    if routed is None or abs(gain) < 1e-9:
        return "–"
    return f"{100 * (routed['accuracy'] - base['accuracy']) / gain:.0f}%"


rows = []
pooled = {"prompt": 0.0, "classifier": 0.0, "oracle": 0.0}
for task in ["arith", "pyfunc", "arc_easy", "sst2", "arc_challenge"]:
    res = {}
    for f in (f"{task}.json", f"{task}-routed.json", f"{task}-fewshot.json"):
        res.update(load(f))
    if not res:
        continue
    base = res.get("base")
    if task in ORACLE:
        oracle_name = ORACLE[task]
        kind = "held-out"
    else:
        experts = [k for k in ("math", "code", "reasoning", "sentiment") if k in res]
        oracle_name = max(experts, key=lambda k: res[k]["accuracy"]) if experts else None
        kind = "unseen"
    oracle = res.get(oracle_name)
    few = res.get(f"fewshot-{task}")
    prompt, clf = res.get("route:prompt"), res.get("route:classifier")
    if kind == "held-out" and base and oracle and prompt and clf:
        pooled["prompt"] += prompt["accuracy"] - base["accuracy"]
        pooled["classifier"] += clf["accuracy"] - base["accuracy"]
        pooled["oracle"] += oracle["accuracy"] - base["accuracy"]
    rows.append(f"| {task} ({kind}) | {res[next(iter(res))]['n']} | {cell(base)} | {cell(prompt)} | {cell(clf)} | "
                f"{cell(few)} | {cell(oracle)} ({oracle_name}) | "
                f"{share(prompt, base, oracle) if base and oracle else '–'} / "
                f"{share(clf, base, oracle) if base and oracle else '–'} |")
print("| task | n | base | prompt routing | classifier routing | few-shot | oracle expert | share of oracle gain (prompt / classifier) |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
if pooled["oracle"] > 0:
    print(f"\nHeld-out tasks pooled: the oracle experts gain {100 * pooled['oracle']:.0f} points over base; prompt "
          f"routing keeps {100 * pooled['prompt'] / pooled['oracle']:.0f}% of that, classifier routing "
          f"{100 * pooled['classifier'] / pooled['oracle']:.0f}%.")
