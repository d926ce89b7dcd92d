#!/usr/bin/env bash
# Every GPU figure of issue 11 from one release binary, in one run on the GPU machine (at most 8 minutes:
# each section is time-boxed, and a section gets no more than what is left of BUDGET): correctness (t2 selftest), kernel
# launches per decode step (ncu), t2 bench at the Llama-3.2-1B and Llama-3-8B shapes (random bf16 weights),
# the serving load generator against `t2 serve --device cuda`, the batch-1 step with and without stacked
# projections, and the decomposition on cuSOLVER.
# Each section is time-boxed and writes its own file, so a rerun can skip what already came back.
#
#   bash scripts/gpu-check.sh BINARY MODEL.gguf OUTDIR
#
# Build the binary on a CPU machine (../shared/gpu.md: `cargo build --release --features cuda`), strip and
# compress it, carry it and the default model to the GPU machine, and run this there; ../shared/gpu's
# with-gpu-libs.sh must lie beside the binary. Environment:
#   DEVICE=cuda        where to run (cpu runs the same sections, for checking this script)
#   SHAPES="llama-3.2-1b llama-3-8b"   random shapes for t2 bench
#   SERVE_SHAPE=llama-3.2-1b            random shape behind the serving measurement
#   BUDGET=470                          seconds for all sections (8 minutes, less packing the results);
#                                       sections run in order of importance, and one that would start with
#                                       less than 10 s left is skipped
#   SKIP="launches serve ..."           sections to leave out (selftest launches bench-SHAPE serve decomp,
#                                       bench-smollm2-135m-unstacked)
set -uo pipefail
BIN=$(realpath "$1")
MODEL=$(realpath "$2")
OUT=$(realpath -m "$3")
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-llama-3.2-1b llama-3-8b}
SERVE_SHAPE=${SERVE_SHAPE:-llama-3.2-1b}
SKIP=${SKIP:-}
BUDGET=${BUDGET:-470}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
WRAP=""
[[ -f "$(dirname "$BIN")/with-gpu-libs.sh" ]] && WRAP="$(dirname "$BIN")/with-gpu-libs.sh"
t2() { if [[ -n $WRAP ]]; then bash "$WRAP" "$BIN" "$@"; else "$BIN" "$@"; fi; }
skip() { [[ " $SKIP " == *" $1 "* ]]; }
section() {
    local name=$1 limit=$2
    shift 2
    skip "$name" && return
    local left=$((BUDGET - SECONDS))
    if ((left < 10)); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        return 124
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    echo "=== $name (at most ${limit}s)"
    timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
    t2 --version
    nproc
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

export BIN WRAP
export -f t2
probe() { section "selftest-$1" 40 t2 selftest --device "$DEVICE" --no-model --json "$OUT/selftest-$1.json"; }
if ! section selftest 80 t2 selftest --device "$DEVICE" --model "$MODEL" --json "$OUT/selftest.json"; then
    # Which part is at fault? The random-model checks alone as served, then with separate projections,
    # then without any fused kernel; the benchmarks run in the first configuration whose checks pass.
    if ! probe served; then
        export T2_CUDA_UNSTACKED=1
        if ! probe unstacked; then
            export T2_CUDA_UNFUSED=1
            probe unfused || unset T2_CUDA_UNFUSED T2_CUDA_UNSTACKED
        fi
    fi
fi

limit_for() { [[ $1 == llama-3-8b ]] && echo 100 || echo 80; }
for shape in $SHAPES; do
    section "bench-$shape" "$(limit_for "$shape")" t2 bench --device "$DEVICE" --random "$shape" \
        --targets mlp --modes base,merged,mixes --mixes 65 --batches 1,8,64 --prompt-len 128 \
        --decode-steps 32 --json "$OUT/bench-$shape.json"
done

serve() {
    local port=18080
    t2 serve --device "$DEVICE" --model "$MODEL" --random "$SERVE_SHAPE" --targets mlp --port $port \
        --max-batch 64 --mix-capacity 8 >"$OUT/serve-server.log" 2>&1 &
    local pid=$!
    python3 - "$port" <<'PY' || return 1
import sys, time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("the server did not become ready")
PY
    local model="random-$SERVE_SHAPE"
    python3 "$HERE/loadgen.py" --url "http://127.0.0.1:$port" --model "$model" --concurrency 1,16,64 \
        --max-tokens 64 --json "$OUT/serve-base.json"
    python3 "$HERE/loadgen.py" --url "http://127.0.0.1:$port" --model "$model" --concurrency 1,16,64 \
        --max-tokens 64 --mixes 'random-0=1;random-1=1;random-2=1;random-3=1' --json "$OUT/serve-mixes.json"
    kill "$pid"
    wait "$pid" 2>/dev/null
    grep -i "device memory" "$OUT/serve-server.log"
}
export BIN MODEL OUT DEVICE SERVE_SHAPE HERE WRAP
export -f t2 serve
section serve 100 serve

# Kernel launches per forward pass: ncu lists launches in order (the first 2,500: setup, then about three
# forwards of a SmolLM2-shaped random model); scripts/gpu-launches.py counts from the first attention kernel.
launches() {
    command -v ncu >/dev/null || { echo "no ncu on this machine"; return 1; }
    ncu --csv --page raw --metrics gpu__time_duration.sum --launch-count 2500 ${WRAP:+bash "$WRAP"} "$BIN" \
        bench --device "$DEVICE" --random smollm2-135m --targets mlp --modes base --batches 1 \
        --prompt-len 8 --decode-steps 8 >"$OUT/ncu.csv" || return 1
    python3 "$HERE/gpu-launches.py" "$OUT/ncu.csv" --layers 30 --json "$OUT/launches.json"
}
export -f launches
section launches 60 launches
# The same model unprofiled: its batch-1 decode step time ÷ launches per step is the host time per launch.
section bench-smollm2-135m 35 t2 bench --device "$DEVICE" --random smollm2-135m --targets mlp \
    --modes base --batches 1 --prompt-len 8 --decode-steps 64 --json "$OUT/bench-smollm2-135m.json"
# The same with q/k/v and gate/up as separate GEMMs (3 launches more per layer): what stacking saved, and
# (step time difference ÷ 90 launches) the host time per launch measured a second way.
if [[ -z ${T2_CUDA_UNSTACKED:-} ]]; then
    section bench-smollm2-135m-unstacked 25 env T2_CUDA_UNSTACKED=1 bash -c 't2 "$@"' _ bench \
        --device "$DEVICE" --random smollm2-135m --targets mlp --modes base --batches 1 --prompt-len 8 \
        --decode-steps 64 --json "$OUT/bench-smollm2-135m-unstacked.json"
fi

section decomp 60 t2 decompose-bench --shape llama-3-8b --device "$DEVICE" --json "$OUT/decomp-gpu.json"

tar -C "$OUT" -czf "$OUT/../gpu-check.tar.gz" . && mv "$OUT/../gpu-check.tar.gz" "$OUT/"
echo "=== done: $(ls "$OUT" | tr '\n' ' ')"
