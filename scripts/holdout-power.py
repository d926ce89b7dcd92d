"""How often a hold-out of K examples picks each contender, from per-item results on a training split.

Usage: holdout-power.py EVAL_JSON [K ...]
EVAL_JSON is `t2 eval --split train --json` over the contenders (base, experts alone, a mix), listed
from fewest experts to most: the order in which `t2 adapt --holdout` breaks a tie. Draws K items at random
(20,000 times, fixed seed) and reports the share of draws in which each contender scores highest, ties
going to the earlier one. Uses only the training split, never the test split.
"""

import json
import random
import sys


def main() -> None:
    results = json.load(open(sys.argv[1]))
    sizes = [int(k) for k in sys.argv[2:]] or [10, 20, 40, 80, 160]
    names = [r["adaptation"] for r in results]
    right = [[c == "1" for c in r["per_item"]] for r in results]
    n = len(right[0])
    rng = random.Random(1)
    draws = 20_000
    print("| held-out examples | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in sizes:
        wins = [0] * len(names)
        for _ in range(draws):
            idx = rng.sample(range(n), k)
            scores = [sum(r[i] for i in idx) for r in right]
            # max() keeps the first of equals: the contender with fewer experts.
            wins[max(range(len(names)), key=lambda j: (scores[j], -j))] += 1
        print(f"| {k} | " + " | ".join(f"{100 * w / draws:.1f}%" for w in wins) + " |")


if __name__ == "__main__":
    main()
