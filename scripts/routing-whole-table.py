"""Routed accuracy on the areas' whole test splits, from pass 1's labels and each expert's answers.

Usage: routing-whole-table.py DIR MANIFEST CHECK_TASK TASK...
DIR holds <task>.json (scripts/eval-whole-splits.sh: base and every expert on the task's whole test split,
per item) and routing-whole.json (`t2 eval --mode route`: pass 1's label of every item). A hard-routed
answer is the label's expert alone (the base model for `other`), so routed accuracy is read item by item.
The oracle is the expert of the task's own area (on the unseen arc_challenge, the best single expert).
The share of the oracle's gain that routing keeps is (routed - base) / (oracle - base), per task and
pooled over the held-out tasks by items. CHECK_TASK's routed answers, generated for real
(routing-check-<task>.json), are compared item by item with the derived ones.
"""

import json
import os
import sys

HELD_OUT = {"arith": "math", "pyfunc": "code", "arc_easy": "reasoning", "sst2": "classification"}


def stem(adaptation: str) -> str:
    """The expert name an eval row stands for (`file:.../math.safetensors` is the math expert)."""
    if adaptation.startswith("file:"):
        return os.path.splitext(os.path.basename(adaptation[5:]))[0]
    return adaptation


def main() -> None:
    d, manifest_path, check_task, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    manifest = json.load(open(manifest_path))
    expert_of = {e["category"]: e["name"] for e in manifest["experts"] if e["category"] != "routing"}
    routes = json.load(open(os.path.join(d, "routing-whole.json")))
    print("| task | n | base | oracle expert | prompt: pass 1 right | prompt: routed | prompt: gain kept "
          "| classifier: pass 1 right | classifier: routed | classifier: gain kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pooled = {s: [0, 0] for s in ("route:prompt", "route:classifier")}
    derived = {}
    for task in tasks:
        path = os.path.join(d, f"{task}.json")
        if not os.path.exists(path):
            continue
        rows = {stem(r["adaptation"]): r for r in json.load(open(path))}
        base = rows["base"]
        n = base["n"]
        if task in HELD_OUT:
            oracle_name = expert_of[HELD_OUT[task]]
        else:
            oracle_name = max((k for k in rows if k != "base"), key=lambda k: rows[k]["correct"])
        oracle = rows[oracle_name]
        gain = oracle["correct"] - base["correct"]
        cells = [task, str(n), f"{100 * base['accuracy']:.1f}%",
                 f"{oracle_name} {100 * oracle['accuracy']:.1f}%"]
        for strategy in ("route:prompt", "route:classifier"):
            r = next(x for x in routes if x["task"] == task and x["adaptation"] == strategy)
            assert len(r["labels"]) == n, f"{task}: labels of {len(r['labels'])} items, results of {n}"
            answers = []
            for i, label in enumerate(r["labels"]):
                name = expert_of.get(label, "base")  # `other` (or no decision): the base model
                answers.append(rows[name]["per_item"][i])
            routed = answers.count("1")
            derived[(task, strategy)] = "".join(answers)
            kept = f"{100 * (routed - base['correct']) / gain:.0f}%" if gain > 0 else "– (no gain)"
            cells += [f"{100 * r['accuracy']:.1f}%", f"{100 * routed / n:.1f}%", kept]
            if task in HELD_OUT and gain > 0:
                pooled[strategy][0] += routed - base["correct"]
                pooled[strategy][1] += gain
        print("| " + " | ".join(cells) + " |")
    print()
    for strategy, (kept, gain) in pooled.items():
        if gain:
            print(f"Held-out tasks pooled, {strategy}: keeps {kept} of the oracle experts' {gain} items "
                  f"of gain ({100 * kept / gain:.0f}%).  ")
    check = os.path.join(d, f"routing-check-{check_task}.json")
    if check_task and os.path.exists(check) and (check_task, "route:classifier") in derived:
        real = next(r for r in json.load(open(check)) if r["adaptation"] == "route:classifier")
        mine = derived[(check_task, "route:classifier")]
        same = sum(a == b for a, b in zip(real["per_item"], mine))
        print(f"\nCheck of the derivation on {check_task}: routed answers generated for real "
              f"({100 * real['accuracy']:.1f}%) and derived from the labels ({100 * mine.count('1') / len(mine):.1f}%) "
              f"agree on {same} of {len(mine)} items.")


if __name__ == "__main__":
    main()
