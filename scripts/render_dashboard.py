#!/usr/bin/env python3
"""Renders deploy/grafana/dashboard.png: the Grafana dashboard's queries over real traffic, plotted from
Prometheus's HTTP API in the dashboard's own layout (Debian has no Grafana package to screenshot).

Runs `t2 serve` on the shipped experts (target/debug/t2 or $T2_BIN), Prometheus scraping it every second
(Debian's package), and scripts/loadgen.py with experts, a stored mix, ad-hoc mixes and routed `:auto`
requests at rising concurrency, plus a few client errors and one disconnect; then queries every panel's
expressions over the run with /api/v1/query_range. Needs matplotlib (scripts/deploy-extended.sh installs it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from deploy_support import PrometheusServer, dashboard, with_grafana_variables  # noqa: E402
from t2_harness import BASE_MODEL, ServerProcess, post_json  # noqa: E402

STEP_S = 2
RATE_INTERVAL = "15s"
MIXES = ";".join([f"{BASE_MODEL}:math", f"{BASE_MODEL}:auto", "math=0.6,code=0.4", f"{BASE_MODEL}:code",
                  f"{BASE_MODEL}:fewshot-arith", f"{BASE_MODEL}:sentiment"])


def client_errors_and_a_disconnect(server: ServerProcess) -> None:
    for body in ({"model": f"{BASE_MODEL}:nope", "messages": [{"role": "user", "content": "hi"}]},
                 {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}):
        post_json(server.base_url, "/v1/chat/completions", body)
    # A client that leaves mid-answer: a disconnect cancellation.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": BASE_MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200,
        "stream": True}), {"Content-Type": "application/json"})
    conn.getresponse().readline()
    conn.close()


def drive_traffic(server: ServerProcess, levels: str, requests: int, max_tokens: int) -> None:
    load = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "loadgen.py"), "--url", server.base_url,
                             "--concurrency", levels, "--requests", str(requests), "--max-tokens", str(max_tokens),
                             "--mixes", MIXES])
    # Mid-run, once every series exists, so that rate() sees them move.
    for _ in range(2):
        time.sleep(15)
        client_errors_and_a_disconnect(server)
    if load.wait() != 0:
        raise SystemExit("loadgen failed")


def render(prometheus: PrometheusServer, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from datetime import datetime

    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, rows * 0.42))
    fig.suptitle(f"{board['title']} — t2 + Prometheus + scripts/loadgen.py, {datetime.now():%Y-%m-%d %H:%M}",
                 fontsize=13)
    grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2)
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"] - 1, pos["x"]:pos["x"] + pos["w"]])
        ax.set_title(panel["title"], fontsize=10, loc="left")
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        drawn = 0
        for target in panel["targets"]:
            expr = with_grafana_variables(target["expr"], RATE_INTERVAL)
            if panel["type"] == "table":
                answer = prometheus.api("query_range", query=expr, start=start, end=end, step=STEP_S)
                series = answer["data"]["result"]
                busy = [s["metric"].get("running_lora_adapters", "") for s in series
                        for _ in s["values"]] if series else []
                lines = sorted({b for b in busy if b})
                ax.axis("off")
                text = "\n".join(["running_lora_adapters seen during the run:"] + [f"  {b}" for b in lines[:8]])
                ax.text(0, 1, text, va="top", family="monospace", fontsize=8, transform=ax.transAxes)
                drawn += len(series)
                continue
            answer = prometheus.api("query_range", query=expr, start=start, end=end, step=STEP_S)
            assert answer["status"] == "success", (expr, answer)
            for series in answer["data"]["result"]:
                legend = target.get("legendFormat") or ""
                for key, value in series["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if unit == "percentunit":
                    ys = [y * 100 for y in ys]
                ax.plot(xs, ys, label=legend or json.dumps(series["metric"]), linewidth=1.2)
                drawn += 1
        if panel["type"] != "table":
            ax.set_xlabel("s since start", fontsize=7)
            ax.set_ylabel({"s": "seconds", "reqps": "req/s", "percentunit": "%", "short": ""}.get(unit, unit),
                          fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=6, loc="upper left", ncol=3)
        print(f"{panel['title']}: {drawn} series")
    fig.subplots_adjust(top=1 - 1.2 / rows)
    fig.savefig(out, dpi=72, bbox_inches="tight")
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "deploy" / "grafana" / "dashboard.png"))
    parser.add_argument("--levels", default="1,4,8", help="loadgen concurrency levels")
    parser.add_argument("--requests", type=int, default=24, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="t2-dashboard-"))
    experts = work / "experts"
    shutil.copytree(REPO_ROOT / "experts", experts)
    server = ServerProcess(experts, work, name="dashboard").start()
    prometheus = PrometheusServer([f"127.0.0.1:{server.port}"], work).start()
    try:
        start = time.time()
        drive_traffic(server, args.levels, args.requests, args.max_tokens)
        time.sleep(20)  # the idle tail: rates fall back, the queue empties
        prometheus.wait_for_scrape(after=time.time())
        render(prometheus, start, time.time(), Path(args.out))
    finally:
        prometheus.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
