"""Few-shot at the paper's budget against base and the single experts, paired on the same test items.

Usage: fewshot-table.py FEWSHOT_DIR WHOLE_DIR TASK...
Reads FEWSHOT_DIR/<task>.json and .search.json (scripts/fewshot-paper.sh) and WHOLE_DIR/<task>.json
(scripts/eval-whole-splits.sh: base and every expert on the same whole test split) and prints a Markdown
table: accuracy with its 95% interval, and McNemar's exact two-sided test against base and against the
best single expert (the one with the highest test accuracy, which favours the expert).
"""

import json
import math
import os
import sys


def mcnemar(a: str, b: str) -> tuple[int, int, float]:
    """Items only `a` got right, only `b` got right, and the exact two-sided p of that split."""
    assert len(a) == len(b), "results on different items"
    only_a = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def label(adaptation: str) -> str:
    if adaptation.startswith("file:"):
        return os.path.basename(os.path.dirname(adaptation[5:])) or adaptation
    return adaptation


def main() -> None:
    fewshot_dir, whole_dir, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
    print("| task | adaptation | n | accuracy | 95% CI | vs base (base only / it only, p) "
          "| vs best expert (expert only / it only, p) |")
    print("|---|---|---|---|---|---|---|")
    searches = []
    for task in tasks:
        fpath, wpath = (os.path.join(d, f"{task}.json") for d in (fewshot_dir, whole_dir))
        if not (os.path.exists(fpath) and os.path.exists(wpath)):
            continue
        whole = json.load(open(wpath))
        base = next(r for r in whole if r["adaptation"] == "base")
        experts = [r for r in whole if r["adaptation"] != "base"]
        best = max(experts, key=lambda r: r["correct"])
        fewshot = json.load(open(fpath))
        # Which selection each row is (scripts/fewshot-paper.sh's selections; one row may be several).
        sel_path = os.path.join(fewshot_dir, f"{task}.selections.json")
        kinds = {}
        if os.path.exists(sel_path):
            for kind, adaptation in json.load(open(sel_path)).items():
                kinds.setdefault(adaptation, []).append(kind)
        labelled = [(r, " (few-shot " + ", ".join(kinds.get(r["adaptation"], ["?"])) + ")") for r in fewshot]
        if not kinds:
            labelled = [(r, " (few-shot best)" if i == 0 else " (few-shot mean)") for i, r in enumerate(fewshot)]
        for r, kind in [(base, ""), (best, " (best expert)")] + labelled:
            lo, hi = r["ci95"]
            cells = []
            for other in (base, best):
                if r is other:
                    cells.append("–")
                else:
                    x, y, p = mcnemar(other["per_item"], r["per_item"])
                    cells.append(f"{x} / {y}, p = {p:.2g}")
            print(f"| {task} | {label(r['adaptation'])}{kind} | {r['n']} | {100 * r['accuracy']:.1f}% "
                  f"| {100 * lo:.1f}–{100 * hi:.1f}% | {cells[0]} | {cells[1]} |")
        spath = os.path.join(fewshot_dir, f"{task}.search.json")
        if os.path.exists(spath):
            s = json.load(open(spath))
            o = s["outcome"]
            alpha = ", ".join(f"{e} {a:.2f}" for e, a in zip(s["config"]["experts"], o["best"]["alpha"]))
            held = o.get("holdout")
            chosen = "–"
            if held:
                c = held["contenders"][held["chosen"]]
                chosen = (f"{c['label']}: {100 * c['holdout']['accuracy']:.0f}% of {len(held['ids'])} "
                          f"(search best {100 * held['contenders'][0]['holdout']['accuracy']:.0f}%)")
            searches.append(f"| {task} | {len(o['history'])} × {s['config']['population']} | "
                            f"{o['generations']} | {100 * o['best']['accuracy']:.0f}% | {chosen} | {alpha} | "
                            f"{o['seconds'] / 60:.0f} min |")
    if searches:
        print("\nThe searches (selection on the 10 shots and the held-out examples only; α of the stored "
              "candidate):\n")
        print("| task | iterations × population | answers scored | shots right | held-out choice | α | wall time |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(searches))


if __name__ == "__main__":
    main()
