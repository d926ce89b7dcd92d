"""A real Prometheus (Debian's package) scraping a real `t2 serve`: every PromQL expression of the Grafana
dashboard and of deploy/README.md must parse and return data after mixed traffic (experts, a stored mix, an
ad-hoc mix, routed `:auto` requests, client errors), and the figures Prometheus computes from t2's metrics must
agree with what the load generator measured for the same traffic. Also the alert rules, through promtool."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from deploy_support import (ALERT_TESTS, ALERTS, PrometheusServer, alert_rules, dashboard_queries,
                            readme_queries, require_binary, with_grafana_variables)
from t2_harness import BASE_MODEL, REPO_ROOT, post_json

# Routed, expert, ad-hoc mix and stored-mix requests, round-robin (scripts/loadgen.py --mixes).
LOAD_KINDS = f"{BASE_MODEL}:math;{BASE_MODEL}:auto;math=0.5,code=0.5;{BASE_MODEL}:blend"
LOAD_REQUESTS = 16
LOAD_CONCURRENCY = 3
LOAD_MAX_TOKENS = 12
# The bar: Prometheus's figure within 20% of the load generator's, or in the same histogram bucket.
TOLERANCE = 0.20
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf]


def test_promtool_checks_the_alert_rules():
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout, check.stdout
    test = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout, test.stdout


def test_every_alert_is_unit_tested():
    import yaml

    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert tested == {rule["alert"] for rule in alert_rules()}, tested


@pytest.fixture(scope="module")
def traffic(server, tmp_path_factory):
    """Prometheus scraping the shared server while scripts/loadgen.py drives LOAD_KINDS through it."""
    workdir = tmp_path_factory.mktemp("prometheus")
    prometheus = PrometheusServer([f"127.0.0.1:{server.port}"], workdir).start()
    try:
        prometheus.wait_for_scrape(after=time.time())
        # Client errors first, so that their series exist for the whole window of the error panels.
        assert post_json(server.base_url, "/v1/chat/completions", {
            "model": f"{BASE_MODEL}:no-such-expert", "messages": [{"role": "user", "content": "hi"}]}).status == 404
        assert post_json(server.base_url, "/v1/chat/completions", {
            "model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).status == 400
        prometheus.wait_for_scrape(after=time.time())
        # Every sample at or before this instant predates the load: the counters' baseline.
        before_load = time.time()
        report = workdir / "loadgen.json"
        run = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "loadgen.py"), "--url", server.base_url,
             "--concurrency", str(LOAD_CONCURRENCY), "--requests", str(LOAD_REQUESTS),
             "--max-tokens", str(LOAD_MAX_TOKENS), "--mixes", LOAD_KINDS, "--warmup", "0",
             "--json", str(report)], capture_output=True, text=True, timeout=600)
        ended = time.time()
        assert run.returncode == 0, run.stdout + run.stderr
        level = json.loads(report.read_text())["levels"][0]
        assert level["errors"] == 0 and level["requests"] == LOAD_REQUESTS, level
        prometheus.wait_for_scrape(after=ended + 0.5)
        settled = time.time()
        # $__rate_interval becomes the load's own span, so that Prometheus averages over what the load
        # generator timed (rate() extrapolates the 1 s scrapes to the window's edges).
        started = ended - level["wall_s"]
        at = ended
        window_s = at - started
        yield {"prometheus": prometheus, "load": level, "at": at, "window_s": window_s,
               "rate_interval": f"{int(window_s * 1000)}ms", "server": server,
               "before_load": before_load, "settled": settled}
    finally:
        prometheus.stop()


def _evaluate(traffic, expr: str) -> dict:
    return traffic["prometheus"].query(with_grafana_variables(expr, traffic["rate_interval"]), traffic["at"])


def test_every_dashboard_and_readme_query_returns_data(traffic):
    queries = [(f"dashboard: {title}", expr) for title, expr in dashboard_queries()]
    queries += [("deploy/README.md", expr) for expr in readme_queries()]
    assert len(queries) >= 30, queries
    failing, empty = [], []
    for where, expr in queries:
        answer = _evaluate(traffic, expr)
        if answer["status"] != "success":
            failing.append((where, expr, answer.get("error")))
        elif not answer["data"]["result"]:
            empty.append((where, expr))
    print(f"\nPromQL evaluated against Prometheus scraping t2: {len(queries)} "
          f"({len(dashboard_queries())} dashboard, {len(readme_queries())} README); "
          f"{len(failing)} failing, {len(empty)} empty")
    assert not failing, failing
    assert not empty, empty


def test_alert_expressions_evaluate_on_real_series(traffic):
    # Healthy traffic: every rule must parse and run; none may fire on it.
    for rule in alert_rules():
        answer = _evaluate(traffic, rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)
        assert answer["data"]["result"] == [], (rule["alert"], answer["data"]["result"])


def _dashboard_expr(title: str, legend: str | None = None) -> str:
    matches = [expr for panel_title, expr in dashboard_queries() if panel_title == title]
    if legend is not None:
        from deploy_support import dashboard

        matches = [t["expr"] for p in dashboard()["panels"] if p["title"] == title
                   for t in p.get("targets", []) if t["legendFormat"] == legend]
    assert len(matches) == 1, (title, legend, matches)
    return matches[0]


def _same_bucket(a: float, b: float) -> bool:
    def bucket(v):
        return next(i for i, upper in enumerate(TTFT_BUCKETS) if v <= upper)

    return bucket(a) == bucket(b)


def _close(measured: float, reference: float) -> bool:
    return abs(measured - reference) <= TOLERANCE * reference


def test_prometheus_figures_match_the_load_generator(traffic):
    load = traffic["load"]
    prometheus_rates = _evaluate(traffic, _dashboard_expr("Completion requests by status"))["data"]["result"]
    ok_rate = sum(float(s["value"][1]) for s in prometheus_rates if s["metric"].get("status") == "200")
    tokens_per_s = float(_evaluate(traffic, _dashboard_expr("Output throughput", "generated tok/s"))
                         ["data"]["result"][0]["value"][1])
    ttft_p50 = float(_evaluate(traffic, _dashboard_expr("Time to first token", "p50"))["data"]["result"][0]["value"][1])
    print(f"\nrequest rate: prometheus {ok_rate:.3f}/s, loadgen {load['requests_per_s']:.3f}/s; "
          f"output: prometheus {tokens_per_s:.2f} tok/s, loadgen {load['output_tok_per_s']:.2f} tok/s; "
          f"TTFT p50: prometheus {ttft_p50:.3f} s, loadgen {load['ttft_p50_s']:.3f} s "
          f"(window {traffic['window_s']:.1f} s, load {load['wall_s']:.1f} s)")
    assert _close(ok_rate, load["requests_per_s"]), (ok_rate, load["requests_per_s"])
    assert _close(tokens_per_s, load["output_tok_per_s"]), (tokens_per_s, load["output_tok_per_s"])
    assert _close(ttft_p50, load["ttft_p50_s"]) or _same_bucket(ttft_p50, load["ttft_p50_s"]), (
        ttft_p50, load["ttft_p50_s"])


def _counter_delta(traffic, expr: str, by: str | None) -> dict:
    """The change of a summed counter between the last scrape before the load and the first after it."""
    def totals(at):
        answer = traffic["prometheus"].query(expr, at)
        assert answer["status"] == "success", (expr, answer)
        return {s["metric"].get(by) if by else None: float(s["value"][1]) for s in answer["data"]["result"]}

    before, after = totals(traffic["before_load"]), totals(traffic["settled"])
    return {key: round(value - before.get(key, 0.0)) for key, value in after.items()}


def test_counts_in_prometheus_equal_the_traffic_sent(traffic):
    """Exact totals over the load: the requests by adaptation and the routing decisions of :auto.

    Raw counter samples, not increase(): over a window of a few 1 s scrapes, increase()'s extrapolation to the
    window's edges can miss the truth by more than one request."""
    per_kind = LOAD_REQUESTS // len(LOAD_KINDS.split(";"))
    by_adaptation = _counter_delta(
        traffic, 'sum by (adaptation) (t2_requests_by_adaptation_total{job="t2"})', "adaptation")
    for label in ("math", "auto", "custom", "blend"):
        assert by_adaptation.get(label, 0) == per_kind, by_adaptation
    decisions = _counter_delta(traffic, 'sum(t2_routing_decisions_total{job="t2"})', None)
    assert decisions.get(None, 0) == per_kind, decisions
