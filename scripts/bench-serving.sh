#!/usr/bin/env bash
# Side-by-side serving benchmark on this machine: llama.cpp's llama-server (F32, F16, Q4_1 copies of the
# default model) vs t2 serve (f32: base model, and 4 different mixes in flight; `t2-q8`: the base model with
# --dtype q8_0, beside llama-server on the Q4_1 file and on a Q8_0 copy; `t2-bf16`: bf16 weights), driven identically by
# scripts/loadgen.py (streaming, 128 tokens, ignore_eos, temperature 0) at concurrency 1, 4, 16, 64.
# Usage: LLAMA_SERVER=~/lab/llama.cpp/bin/llama-server LLAMA_MODELS=~/lab/models bash scripts/bench-serving.sh
# (the dense ggufs come from ../shared/peer/dequant_gguf.py). Results: bench-out/serving/*.json and tables.
# Every server runs REPEATS times (3 by default), interleaved (all servers, then all again, ...), so that drift
# in the machine's speed hits each alike; the table gives each figure's median over the repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
T2_BIN=${T2_BIN:-target/release/t2}
LLAMA_SERVER=${LLAMA_SERVER:-$HOME/lab/llama.cpp/bin/llama-server}
LLAMA_MODELS=${LLAMA_MODELS:-$HOME/lab/models}
LEVELS=${LEVELS:-"1:4 4:8 16:32 64:64"}   # concurrency:requests
MAX_TOKENS=${MAX_TOKENS:-128}
ONLY=${ONLY:-"llama-f32 llama-f16 llama-q4_1 llama-q8_0 t2-base t2-mixes t2-bf16 t2-q8"}
REPEATS=${REPEATS:-3}
T2_ARGS=${T2_ARGS:-}   # extra `t2 serve` flags for every t2 server (A/B runs of a knob)
OUT=bench-out/serving
PORT=18181
mkdir -p "$OUT"

wait_ready() { # url path
    for _ in $(seq 1 240); do
        curl -sf "$1$2" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "server at $1 never became ready" >&2
    return 1
}

run_levels() { # name extra-loadgen-args...
    local name=$1; shift
    for lv in $LEVELS; do
        local c=${lv%%:*} n=${lv##*:}
        python3 scripts/loadgen.py --url "http://127.0.0.1:$PORT" --concurrency "$c" --requests "$n" \
            --max-tokens "$MAX_TOKENS" --warmup 1 --json "$OUT/$name-c$c-r$rep.json" "$@" | tail -n 1 \
            | sed "s/^/$name (repeat $rep) /"
    done
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

rm -f "$OUT"/*-c*-r*.json
for rep in $(seq 1 "$REPEATS"); do
for what in $ONLY; do
    case $what in
    llama-*)
        case $what in
            llama-f32) m=$LLAMA_MODELS/smollm2-f32.gguf ;;
            llama-f16) m=$LLAMA_MODELS/smollm2-f16.gguf ;;
            llama-q4_1) m=models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
            llama-q8_0) m=$LLAMA_MODELS/smollm2-q8_0.gguf ;; # scripts/gguf-q8_0.py
        esac
        "$LLAMA_SERVER" -m "$m" --port $PORT -np 64 -c 32768 -t 2 --log-disable >/dev/null 2>&1 &
        pid=$!
        wait_ready "http://127.0.0.1:$PORT" /health
        run_levels "$what"
        stop $pid
        ;;
    t2-*)
        experts=$(mktemp -d)
        for i in 1 2 3 4; do
            "$T2_BIN" experts synth --experts-dir "$experts" --targets mlp --name "e$i" --seed "$i" >/dev/null
        done
        dtype=f32
        [ "$what" = t2-q8 ] && dtype=q8_0
        [ "$what" = t2-bf16 ] && dtype=bf16
        "$T2_BIN" serve --port $PORT --experts-dir "$experts" --targets mlp --max-batch 64 --dtype $dtype \
            $T2_ARGS >/dev/null 2>&1 &
        pid=$!
        wait_ready "http://127.0.0.1:$PORT" /ready
        if [ "$what" = t2-mixes ]; then
            run_levels "$what" --mixes 'e1=1;e2=1;e3=1;e4=1'
        else
            run_levels "$what"
        fi
        stop $pid
        rm -rf "$experts"
        ;;
    esac
done
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os, statistics
runs = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*-c*-r*.json"))):
    stem, _ = os.path.basename(f)[:-5].rsplit("-r", 1)
    name, c = stem.rsplit("-c", 1)
    d = json.load(open(f))
    runs.setdefault(name, {}).setdefault(int(c), []).append(d["levels"][0] if "levels" in d else d)
rows = {}
for name, by_c in runs.items():
    for c, lvs in by_c.items():
        med = lambda k: statistics.median(lv[k] for lv in lvs)
        rows.setdefault(name, {})[c] = {"output_tok_per_s": med("output_tok_per_s"), "ttft_p50_s": med("ttft_p50_s"),
                                        "ttft_p95_s": med("ttft_p95_s"), "itl_p50_s": med("itl_p50_s"),
                                        "itl_p99_s": med("itl_p99_s"), "errors": sum(lv["errors"] for lv in lvs)}
print(f"medians over {max(len(l) for r in runs.values() for l in r.values())} interleaved repeats")
levels = sorted({c for r in rows.values() for c in r})
print("| server | " + " | ".join(f"c={c} tok/s | TTFT p50/p95 ms" for c in levels) + " |")
print("|---|" + "---|---|" * len(levels))
for name, r in rows.items():
    cells = []
    for c in levels:
        lv = r.get(c)
        if lv is None:
            cells += ["", ""]
            continue
        err = f" ({lv['errors']} errors)" if lv["errors"] else ""
        cells += [f"{lv['output_tok_per_s']:.1f}{err}",
                  f"{lv['ttft_p50_s'] * 1e3:.0f} / {lv['ttft_p95_s'] * 1e3:.0f}"]
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
print("inter-token latency p50 / p99 (ms)")
print("| server | " + " | ".join(f"c={c}" for c in levels) + " |")
print("|---|" + "---|" * len(levels))
for name, r in rows.items():
    cells = [f"{r[c]['itl_p50_s'] * 1e3:.1f} / {r[c]['itl_p99_s'] * 1e3:.1f}" if c in r else "" for c in levels]
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
