#!/usr/bin/env bash
# Pass-1 overhead: median end-to-end latency of `<model>:auto` (pass 1 + pass 2) against the fixed expert it
# routes to, for 128-token streamed answers, one request at a time, the two alternating (paired, so that
# machine noise hits both alike). Uses scripts/loadgen.py; prints the ratio and the server's own pass-1 time.
set -euo pipefail
cd "$(dirname "$0")/.."
T2=${T2:-target/release/t2}
N=${N:-20}
OUT=${OUT:-bench-out/routing-overhead.json}
PROMPT=${PROMPT:-"What is 17 times 23? Explain step by step."}
MODEL=SmolLM2-135M-Instruct
mkdir -p "$(dirname "$OUT")"
LOG=$(mktemp)
"$T2" serve --port 0 >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do grep -q "ready" "$LOG" && break; sleep 0.5; done
PORT=$(grep -o "127.0.0.1:[0-9]*" "$LOG" | head -1 | cut -d: -f2)
python3 scripts/loadgen.py --url "http://127.0.0.1:$PORT" --concurrency 1 --requests "$N" --max-tokens 128 \
  --warmup 2 --prompt "$PROMPT" --mixes "$MODEL:auto;$MODEL:math" --json "$OUT" >/dev/null
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^t2_pass1_seconds_(sum|count)|^t2_routing_decisions_total" \
  >"$OUT.metrics"
python3 - "$OUT" <<'PYEOF'
import json, statistics, sys
doc = json.load(open(sys.argv[1]))
reqs = [r for level in doc["levels"] for r in level["per_request"] if r["ok"]]
by = {}
for r in reqs:
    by.setdefault(r["adaptation"], []).append(r)
auto = [a for a in by if a.endswith(":auto")][0]
fixed = [a for a in by if not a.endswith(":auto")][0]
med = lambda rs, k: statistics.median(r[k] for r in rs)
e_auto, e_fixed = med(by[auto], "e2e_s"), med(by[fixed], "e2e_s")
t_auto, t_fixed = med(by[auto], "ttft_s"), med(by[fixed], "ttft_s")
print(f"| | {auto} | {fixed} | extra |")
print("|---|---|---|---|")
print(f"| median end-to-end (128 tokens) | {e_auto:.2f} s | {e_fixed:.2f} s | {e_auto - e_fixed:+.2f} s ({100 * (e_auto / e_fixed - 1):+.1f}%) |")
print(f"| median time to first token | {t_auto:.2f} s | {t_fixed:.2f} s | {t_auto - t_fixed:+.2f} s |")
print(f"| requests | {len(by[auto])} | {len(by[fixed])} | |")
metrics = dict(l.rsplit(" ", 1) for l in open(sys.argv[1] + ".metrics") if l.startswith("t2_pass1"))
s, n = float(metrics["t2_pass1_seconds_sum"]), float(metrics["t2_pass1_seconds_count"])
print(f"\nserver-side pass 1: {n:.0f} decisions, mean {1000 * s / n:.0f} ms (t2_pass1_seconds)")
PYEOF
