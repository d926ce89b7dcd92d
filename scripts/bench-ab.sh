#!/usr/bin/env bash
# Two t2 binaries compared on this machine, runs interleaved (A, B, A, B, ...) so that drift in the machine's
# speed hits both alike: `t2 bench` (batch-1 and batch-16 decode, prefill; base and 8 different mixes) and
# the serving benchmark (scripts/bench-serving.sh: t2 alone, base and 4 mixes in flight). Prints the median of
# the runs for each figure and B/A.
# Usage: bash scripts/bench-ab.sh A_BIN B_BIN [RUNS]   (results: bench-out/ab/)
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "$1")
B=$(realpath "$2")
RUNS=${3:-3}
OUT=bench-out/ab
rm -rf "$OUT"
mkdir -p "$OUT"
for run in $(seq 1 "$RUNS"); do
    for side in A B; do
        bin=$A
        [ "$side" = B ] && bin=$B
        echo "== run $run, $side ($bin)" >&2
        "$bin" bench --batches 1,16 --targets mlp --modes base,mixes --json "$OUT/bench-$side-$run.json" \
            >/dev/null
        T2_BIN=$bin ONLY="t2-base t2-mixes" LEVELS=${LEVELS:-"1:4 16:32"} MAX_TOKENS=${MAX_TOKENS:-64} \
            bash scripts/bench-serving.sh >/dev/null
        mkdir -p "$OUT/serving-$side-$run"
        mv bench-out/serving/t2-*.json "$OUT/serving-$side-$run/"
    done
done
python3 - "$OUT" "$RUNS" <<'PY'
import glob, json, os, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def med(xs):
    return statistics.median(xs) if xs else float("nan")
rows = {}
for side in "AB":
    for run in range(1, runs + 1):
        rep = json.load(open(os.path.join(out, f"bench-{side}-{run}.json")))
        for r in rep["rows"]:
            for k in ("prefill_tok_s", "decode_tok_s"):
                rows.setdefault((f"t2 bench {r['mode']} b={r['batch']} {k[:-6]}", side), []).append(r[k])
        for f in glob.glob(os.path.join(out, f"serving-{side}-{run}", "*.json")):
            name, c = os.path.basename(f)[:-5].rsplit("-c", 1)
            d = json.load(open(f))
            lv = d["levels"][0] if "levels" in d else d
            for k in ("output_tok_per_s", "ttft_p50_s", "itl_p50_s"):
                if k in lv:
                    rows.setdefault((f"serving {name} c={c} {k}", side), []).append(lv[k])
names = sorted({n for n, _ in rows})
print(f"| figure (median of {runs}) | A | B | B/A |\n|---|---|---|---|")
for n in names:
    a, b = med(rows.get((n, "A"), [])), med(rows.get((n, "B"), []))
    print(f"| {n} | {a:.4g} | {b:.4g} | {b / a:.3f} |")
PY
