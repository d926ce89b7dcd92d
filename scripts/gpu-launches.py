#!/usr/bin/env python3
"""Kernel launches per forward pass from an `ncu --csv --page raw` listing (scripts/gpu-check.sh makes it).

Everything from the first attention launch on belongs to the bench's forward passes; setup (weights, factors,
tables) comes before and is left out. The attention kernel runs once per layer per forward, so the forwards
in the listing are its launches ÷ --layers (a listing cut short by --launch-count ends inside one, which
makes the figure approximate to a fraction of a forward). Prints launches per forward, the GPU time they
take, and the most frequent kernels.

    python3 scripts/gpu-launches.py ncu.csv --layers 30 --json launches.json
"""
import argparse
import collections
import csv
import io
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--layers", type=int, required=True, help="decoder layers of the profiled model")
    p.add_argument("--json")
    a = p.parse_args()
    lines = [l for l in open(a.csv, errors="replace").read().splitlines() if l.startswith('"')]
    head = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if head is None:
        print("no ncu table in", a.csv, file=sys.stderr)
        return 1
    rows = list(csv.reader(io.StringIO("\n".join(lines[head:]))))
    hdr, data = rows[0], [r for r in rows[1:] if r and r[0].isdigit()]
    name_i, time_i = hdr.index("Kernel Name"), hdr.index("gpu__time_duration.sum")
    names = [r[name_i].split("(")[0].strip() for r in data]
    first = next((i for i, n in enumerate(names) if "paged_attention" in n), None)
    if first is None:
        print("no attention kernel among", len(names), "launches", file=sys.stderr)
        return 1
    fwd = names[first:]
    attn = sum("paged_attention" in n for n in fwd)

    def ns(r):
        try:
            return float(r[time_i].replace(",", ""))
        except ValueError:
            return 0.0

    gpu_ns = sum(ns(r) for r in data[first:])
    forwards = attn / a.layers
    per_forward = len(fwd) / forwards
    top = collections.Counter(fwd).most_common(25)
    out = {
        "launches_total": len(names),
        "launches_in_forwards": len(fwd),
        "forwards": forwards,
        "attention_launches": attn,
        "launches_per_forward": per_forward,
        "launches_per_layer": per_forward / a.layers,
        "gpu_us_per_forward": gpu_ns / 1e3 / forwards,
        "top_kernels_per_forward": [(n, c / forwards) for n, c in top],
    }
    print(json.dumps(out, indent=1))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
