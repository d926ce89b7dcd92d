"""Accuracy with its 95% interval per task × adaptation, as an SVG dot plot (no plotting library needed).

Usage: accuracy-plot.py OUT.svg WHOLE_DIR [FEWSHOT_DIR[:FEWSHOT_DIR...]] [ROUTING_TABLE_JSON]
Reads WHOLE_DIR/<task>.json (scripts/eval-whole-splits.sh), and when given FEWSHOT_DIR/<task>.json with
FEWSHOT_DIR/<task>.selections.json (scripts/fewshot-paper.sh), from the first listed folder that has them
(a later run of a task, e.g. chosen on a larger hold-out, listed before the earlier one). One block per task; a dashed line marks
base's accuracy and the shaded band its interval, so an adaptation whose dot leaves the band differs
from base beyond its interval.
"""

import json
import os
import sys
from html import escape

TASKS = ["arith", "pyfunc", "arc_easy", "sst2", "arc_challenge"]
ROW, LEFT, PLOT_W, TOP = 18, 260, 420, 40


def short(adaptation: str) -> str:
    if adaptation.startswith("file:"):
        # A training run's output: named with its run, so that it is not taken for the stored expert.
        path = adaptation[5:]
        name = os.path.basename(path).removesuffix(".safetensors")
        return f"{name} ({os.path.basename(os.path.dirname(path))})"
    if adaptation.startswith("mix:"):
        return "mix " + ", ".join(
            f"{kv.split('=')[0]} {float(kv.split('=')[1]):.2f}" for kv in adaptation[4:].split(",")
        )
    return adaptation


def rows_of(task: str, whole_dir: str, fewshot_dirs: list[str]) -> list[tuple[str, dict]]:
    path = os.path.join(whole_dir, f"{task}.json")
    if not os.path.exists(path):
        return []
    rows = [(short(r["adaptation"]), r) for r in json.load(open(path))]
    for fewshot_dir in fewshot_dirs:
        fpath, spath = (os.path.join(fewshot_dir, f"{task}{ext}") for ext in (".json", ".selections.json"))
        if os.path.exists(fpath) and os.path.exists(spath):
            results = {r["adaptation"]: r for r in json.load(open(fpath))}
            for kind, adaptation in json.load(open(spath)).items():
                if adaptation in results:
                    rows.append((f"few-shot {kind}", results[adaptation]))
            break
    return rows


def main() -> None:
    out, whole_dir = sys.argv[1], sys.argv[2]
    fewshot_dirs = sys.argv[3].split(":") if len(sys.argv) > 3 else []
    blocks = [(t, rows_of(t, whole_dir, fewshot_dirs)) for t in TASKS]
    blocks = [(t, r) for t, r in blocks if r]
    height = TOP + sum((len(r) + 2) * ROW for _, r in blocks) + 30
    width = LEFT + PLOT_W + 40
    x = lambda acc: LEFT + acc * PLOT_W  # noqa: E731
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">Accuracy on whole test splits, '
        f"95% intervals (SmolLM2-135M-Instruct)</text>",
    ]
    for tick in range(0, 101, 20):
        svg.append(f'<line x1="{x(tick / 100)}" y1="{TOP - 8}" x2="{x(tick / 100)}" y2="{height - 30}" '
                   f'stroke="#eee"/>')
        svg.append(f'<text x="{x(tick / 100)}" y="{height - 14}" text-anchor="middle">{tick}%</text>')
    y = TOP
    for task, rows in blocks:
        base = next((r for name, r in rows if name == "base"), None)
        n = rows[0][1]["n"]
        svg.append(f'<text x="10" y="{y + 12}" font-weight="bold">{escape(task)} (n = {n})</text>')
        top, bottom = y + ROW // 2, y + (len(rows) + 1) * ROW
        if base:
            lo, hi = base["ci95"]
            svg.append(f'<rect x="{x(lo)}" y="{top}" width="{x(hi) - x(lo)}" height="{bottom - top}" '
                       f'fill="#dde6f5"/>')
            svg.append(f'<line x1="{x(base["accuracy"])}" y1="{top}" x2="{x(base["accuracy"])}" '
                       f'y2="{bottom}" stroke="#557" stroke-dasharray="4 3"/>')
        y += ROW
        for name, r in rows:
            cy = y + ROW // 2
            lo, hi = r["ci95"]
            colour = "#c33" if name.startswith("few-shot") else "#333"
            svg.append(f'<text x="{LEFT - 8}" y="{cy + 4}" text-anchor="end">{escape(name)}</text>')
            svg.append(f'<line x1="{x(lo)}" y1="{cy}" x2="{x(hi)}" y2="{cy}" stroke="{colour}" '
                       f'stroke-width="2"/>')
            svg.append(f'<circle cx="{x(r["accuracy"])}" cy="{cy}" r="4" fill="{colour}"/>')
            svg.append(f'<text x="{x(hi) + 6}" y="{cy + 4}" fill="#555">{100 * r["accuracy"]:.1f}%</text>')
            y += ROW
        y += ROW
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
