#!/usr/bin/env python3
"""Time to first token with a shared system prompt, one request at a time, against a running `t2 serve`.
Run it against `t2 serve` and `t2 serve --no-prefix-cache` (the README's prefix-cache figures).
Usage: python3 scripts/bench-prefix-cache.py http://127.0.0.1:8080"""
base = sys.argv[1]
system = "You are a support assistant for a hardware store. Answer in one short sentence, politely, and mention the aisle number when a product is asked for. " * 6
qs = ["Where are the hammers?", "Do you sell paint?", "Where can I find screws?", "Is there garden hose?", "Where are light bulbs?", "Do you have ladders?", "Where is the glue?", "Do you cut keys?"]
ttft = []
for q in qs:
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                ttft.append(time.time() - t); break
        for _ in r: pass
usage = urllib.request.urlopen(base + "/metrics").read().decode()
hits = [l for l in usage.splitlines() if l.startswith("t2_prefix_cache_hits_total") or l.startswith("t2_prefix_cache_queries_total")]
print(f"median TTFT {1000*statistics.median(ttft[1:]):.0f} ms over {len(ttft)-1} (first {1000*ttft[0]:.0f} ms)", hits)
