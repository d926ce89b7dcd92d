#!/usr/bin/env bash
# Automatic prefix caching under load: 16 clients at once, every request with the same ~400-token system
# prompt and its own question (scripts/loadgen.py --system), 32 requests of 32 tokens, against `t2 serve`
# with the cache and with --no-prefix-cache. REPEATS (3) interleaved repeats; prints the medians of time to
# first token and output tok/s, and the share of prompt tokens the cache served (from /metrics).
# Usage: bash scripts/bench-prefix-cache.sh   (results: bench-out/prefix-cache/*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
T2_BIN=${T2_BIN:-target/release/t2}
REPEATS=${REPEATS:-3}
OUT=bench-out/prefix-cache
PORT=18182
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# A fixed policy text, repeated to about 400 tokens of SmolLM2's tokenizer.
PARA="You are the support assistant of a small lighthouse museum on a rocky northern coast. Answer visitors' \
questions politely and briefly, in plain language, without inventing opening hours, prices or events that \
this message does not state. The museum opens at ten and closes at five, every day but Monday; tickets cost \
six euros, children under twelve enter free, and guided tours of the tower leave on the hour."
SYSTEM="$PARA $PARA $PARA $PARA $PARA"

for rep in $(seq 1 "$REPEATS"); do
    for mode in cache nocache; do
        flag=()
        [ "$mode" = nocache ] && flag=(--no-prefix-cache)
        "$T2_BIN" serve --port $PORT "${flag[@]}" >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 1 240); do
            curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
            sleep 0.5
        done
        python3 scripts/loadgen.py --url "http://127.0.0.1:$PORT" --concurrency 16 --requests 32 \
            --max-tokens 32 --warmup 1 --system "$SYSTEM" --json "$OUT/$mode-r$rep.json" | tail -n 1 \
            | sed "s/^/$mode (repeat $rep) /"
        curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^t2_prefix_cache_(hits|queries)_total' \
            > "$OUT/$mode-r$rep.metrics" || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
for mode in ("cache", "nocache"):
    lvs = [json.load(open(f))["levels"][0] for f in sorted(glob.glob(f"{out}/{mode}-r*.json"))]
    med = lambda k: statistics.median(lv[k] for lv in lvs)
    shares = []
    for f in sorted(glob.glob(f"{out}/{mode}-r*.metrics")):
        m = dict(line.split()[:2] for line in open(f) if line.strip())
        q = float(m.get("t2_prefix_cache_queries_total", 0))
        if q:
            shares.append(float(m.get("t2_prefix_cache_hits_total", 0)) / q)
    share = f", {statistics.median(shares) * 100:.0f}% of prompt tokens from the cache" if shares else ""
    print(f"{mode}: TTFT p50 {med('ttft_p50_s') * 1e3:.0f} ms, p95 {med('ttft_p95_s') * 1e3:.0f} ms, "
          f"{med('output_tok_per_s'):.1f} tok/s over {len(lvs)} repeats{share}")
PY
