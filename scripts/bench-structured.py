#!/usr/bin/env python3
"""Does structured output slow the other rows of a batch? Against a running `t2 serve`: 8 free streams beside 8
more free ones, then the same 8 beside 8 streams held to a JSON schema (same prompt, same token budget); prints
the first 8 streams' decode speed in both runs, and the mask time per constrained row per step
(t2_structured_mask_seconds) next to the inter-token latency.

Usage: python3 scripts/bench-structured.py http://127.0.0.1:8080 [MODEL]
"""
import json
import statistics
import sys
import threading
import time
import urllib.request

BASE = sys.argv[1].rstrip("/")
MODEL = sys.argv[2] if len(sys.argv) > 2 else "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "price": {"type": "number"}},
    "required": ["name", "price"], "additionalProperties": False}}}, "required": ["items"],
    "additionalProperties": False}
TOKENS = 96


def post(body):
    req = urllib.request.Request(BASE + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run(free, others, constrained):
    results = []

    def one(measured):
        body = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": measured,
                "messages": [{"role": "user", "content": "List things to buy for a picnic, with prices."}]}
        if constrained and not measured:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}
        t = time.time()
        r = post(body)
        results.append((not measured, r["usage"]["completion_tokens"], time.time() - t))

    threads = [threading.Thread(target=one, args=(m,)) for m in [True] * free + [False] * others]
    [t.start() for t in threads]
    [t.join() for t in threads]
    free_rows = [(n, s) for structured, n, s in results if not structured]
    return sum(n for n, _ in free_rows) / max(s for _, s in free_rows)


def metric(name):
    text = urllib.request.urlopen(BASE + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


post({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
# Interleaved (free, constrained, free, ...) so that drift in the machine's speed hits both alike; medians.
speeds = {False: [], True: []}
masks, mask_s, itl_n, itl_s = 0.0, 0.0, 0.0, 0.0
for _ in range(3):
    for constrained in (False, True):
        c0, s0 = metric("t2_structured_mask_seconds_count"), metric("t2_structured_mask_seconds_sum")
        i0, is0 = metric("t2_inter_token_latency_seconds_count"), metric("t2_inter_token_latency_seconds_sum")
        speeds[constrained].append(run(8, 8, constrained))
        if constrained:
            masks += metric("t2_structured_mask_seconds_count") - c0
            mask_s += metric("t2_structured_mask_seconds_sum") - s0
            itl_n += metric("t2_inter_token_latency_seconds_count") - i0
            itl_s += metric("t2_inter_token_latency_seconds_sum") - is0
free, beside = statistics.median(speeds[False]), statistics.median(speeds[True])
print(f"8 free streams beside 8 free:         {free:7.1f} tok/s ({TOKENS} tokens each; runs {speeds[False]})")
print(f"8 free streams beside 8 constrained:  {beside:7.1f} tok/s (runs {speeds[True]}); ratio {beside / free:.3f}")
print(f"masks computed: {masks:.0f}, mean {1e6 * mask_s / max(masks, 1):.0f} us per row per step; "
      f"mean inter-token latency in the constrained runs {1e3 * itl_s / max(itl_n, 1):.1f} ms")
