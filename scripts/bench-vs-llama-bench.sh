#!/usr/bin/env bash
# Paired single-stream benchmark: `t2 bench` against llama.cpp's `llama-bench -t 2 -p 64 -n 32` on this
# machine, the same model at each precision (f32, f16, bf16 weights vs llama.cpp F16, q8_0 vs llama.cpp Q8_0
# and the Q4_1 file itself), REPEATS (3) interleaved rounds; within a round llama-bench averages 5 runs and
# t2 bench takes the median of 5. Prints the medians over the rounds, with every round's figure.
# Usage: LLAMA_BENCH=~/lab/llama.cpp/bin/llama-bench LLAMA_MODELS=~/lab/models bash scripts/bench-vs-llama-bench.sh
# (dense ggufs from ../shared/peer/dequant_gguf.py, the Q8_0 copy from scripts/gguf-q8_0.py).
set -euo pipefail
cd "$(dirname "$0")/.."
T2_BIN=${T2_BIN:-target/release/t2}
LLAMA_BENCH=${LLAMA_BENCH:-$HOME/lab/llama.cpp/bin/llama-bench}
LLAMA_MODELS=${LLAMA_MODELS:-$HOME/lab/models}
REPEATS=${REPEATS:-3}
OUT=bench-out/single-stream
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log
llama() { # precision, model file, round
    "$LLAMA_BENCH" -m "$2" -t 2 -p 64 -n 32 -r 5 -o json > "$OUT/llama-$1-$3.json" 2>/dev/null
}
t2() { # dtype, round
    b=1; m=base
    [ "$1" = f32 ] && b=1,16 && m=base,mixes
    [ "$1" = bf16 ] && m=base,mixes
    "$T2_BIN" bench --dtype "$1" --targets mlp --modes $m --batches $b --decode-steps 32 --repeats 5 \
        --json "$OUT/t2-$1-$2.json" > /dev/null 2> "$OUT/t2-$1-$2.log"
}
# Each t2 run right after the llama.cpp run it is compared with, so that both see the same drift of the
# VM (whose speed wanders by ±30% over minutes); the ratios are then taken per round.
for r in $(seq -w 1 "$REPEATS"); do
    echo "round $r of $REPEATS"
    llama f32 "$LLAMA_MODELS/smollm2-f32.gguf" "$r"; t2 f32 "$r"
    llama f16 "$LLAMA_MODELS/smollm2-f16.gguf" "$r"; t2 f16 "$r"; t2 bf16 "$r"
    llama q8_0 "$LLAMA_MODELS/smollm2-q8_0.gguf" "$r"; t2 q8_0 "$r"
    llama q4_1 models/SmolLM2-135M-Instruct.Q4_1.gguf "$r"
done
python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
med = statistics.median
llama, llama_rounds = {}, {}
for t in ["f32", "f16", "q8_0", "q4_1"]:
    pp, tg = [], []
    for f in sorted(glob.glob(f"{out}/llama-{t}-*.json")):
        for row in json.load(open(f)):
            (pp if row["n_prompt"] > 0 else tg).append(row["avg_ts"])
    llama[t] = (med(pp), med(tg))
    llama_rounds[t] = list(zip(pp, tg))
    print(f"llama.cpp {t}: pp64 {med(pp):.1f} tg32 {med(tg):.1f}  (rounds: pp {[round(x) for x in pp]}, tg {[round(x, 1) for x in tg]})")
peer = {"f32": "f32", "f16": "f16", "bf16": "f16", "q8_0": "q8_0"}
for d in ["f32", "f16", "bf16", "q8_0"]:
    rows, bw = {}, []
    for f in sorted(glob.glob(f"{out}/t2-{d}-*.json")):
        j = json.load(open(f))
        bw.append(j["bandwidth_gb_s"])
        for r in j["rows"]:
            rows.setdefault((r["mode"], r["batch"]), []).append(r)
    print(f"t2 {d}: read bandwidth {med(bw):.1f} GB/s (rounds {[round(x, 1) for x in bw]})")
    for (mode, b), rs in sorted(rows.items()):
        pre, dec = med([r["prefill_tok_s"] for r in rs]), med([r["decode_tok_s"] for r in rs])
        split = {k: round(med([r["decode_split"][k] for r in rs]) * 100) for k in ["gemm", "attention", "sampling", "other"]}
        line = (f"  {mode} b={b}: prefill {pre:.1f} decode {dec:.1f} (rounds {[round(r['decode_tok_s'], 1) for r in rs]}), "
                f"bw fraction {med([r['bandwidth_fraction'] for r in rs]):.2f}, {rs[0]['bytes_per_step'] / 1e6:.0f} MB/step, split % {split}")
        if mode == "base" and b == 1:
            # Median of the per-round ratios (each t2 run beside its llama.cpp run), then the ratio of medians.
            def ratios(peer_t):
                pairs = list(zip(rs, llama_rounds[peer_t]))
                dr = med([r["decode_tok_s"] / lt for r, (lp, lt) in pairs])
                pr = med([r["prefill_tok_s"] / lp for r, (lp, lt) in pairs])
                lp, lt = llama[peer_t]
                return (f"decode {dr:.2f}x, prefill {pr:.2f}x (paired rounds; ratio of medians "
                        f"{dec / lt:.2f}x, {pre / lp:.2f}x)")
            line += f"\n    vs llama.cpp {peer[d].upper()}: {ratios(peer[d])}"
            if d == "q8_0":
                line += f"\n    vs llama.cpp Q4_1: {ratios('q4_1')}"
        print(line)
PY
