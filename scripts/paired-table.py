"""New adaptations against base and against their expert at full strength, paired on the same test items.

Usage: paired-table.py NEW_DIR WHOLE_DIR TASK...
NEW_DIR/<task>.json holds the new rows (e.g. `mix:math=0.75,base=0.25`); WHOLE_DIR/<task>.json holds base
and every shipped expert on the same items (scripts/eval-whole-splits.sh). Prints a Markdown table:
accuracy with its 95% interval, then McNemar's exact two-sided test against base and against the shipped
expert the row scales (a mix's first non-base weight) or would replace (a training run's file of that name).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from importlib import import_module  # noqa: E402

mcnemar = import_module("fewshot-table").mcnemar
stem = import_module("routing-whole-table").stem


def expert_of(adaptation: str) -> str | None:
    """The shipped expert a new row is compared with: the one a mix scales, or the one a trained file
    (`file:.../reasoning.safetensors`) would replace."""
    if adaptation.startswith("file:"):
        return stem(adaptation)
    if adaptation.startswith("mix:"):
        names = [kv.split("=")[0] for kv in adaptation[4:].split(",")]
        return next((n for n in names if n != "base"), None)
    return None


def main() -> None:
    new_dir, whole_dir, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
    print("| task | adaptation | n | accuracy | 95% CI | vs base (base only / it only, p) "
          "| vs the shipped expert it scales or would replace (expert only / it only, p) |")
    print("|---|---|---|---|---|---|---|")
    for task in tasks:
        npath, wpath = os.path.join(new_dir, f"{task}.json"), os.path.join(whole_dir, f"{task}.json")
        if not (os.path.exists(npath) and os.path.exists(wpath)):
            continue
        whole = {stem(r["adaptation"]): r for r in json.load(open(wpath))}
        base = whole["base"]
        for r in json.load(open(npath)):
            full = whole.get(expert_of(r["adaptation"]) or "")
            cells = []
            for other in (base, full):
                if other is None:
                    cells.append("–")
                    continue
                x, y, p = mcnemar(other["per_item"], r["per_item"])
                cells.append(f"{x} / {y}, p = {p:.2g}")
            lo, hi = r["ci95"]
            print(f"| {task} | {r['adaptation']} | {r['n']} | {100 * r['accuracy']:.1f}% "
                  f"| {100 * lo:.1f}–{100 * hi:.1f}% | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
