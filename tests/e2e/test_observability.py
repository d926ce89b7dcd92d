"""/health, /ready, /metrics (Prometheus text format), /openapi.json and /docs."""

from __future__ import annotations

import pytest

from t2_harness import (BASE_MODEL, PrometheusParseError, chat, fetch_metrics, http_request, metric_value,
                        parse_prometheus)

COUNTERS = ["t2_requests_total", "t2_prompt_tokens_total", "t2_generated_tokens_total",
            "t2_requests_by_adaptation_total", "t2_cancellations_total"]
HISTOGRAMS = ["t2_time_to_first_token_seconds", "t2_inter_token_latency_seconds", "t2_request_duration_seconds",
              "t2_queue_time_seconds"]
GAUGES = ["t2_queue_depth", "t2_running_sequences", "t2_kv_cache_used_tokens"]


def test_health_and_ready(base_url):
    assert http_request(base_url, "GET", "/health").status == 200
    ready = http_request(base_url, "GET", "/ready")
    assert ready.status == 200
    assert ready.json()["status"] == "ready"


def test_prometheus_parser_rejects_malformed_text():
    # The parser is what makes the /metrics test meaningful, so it must catch these.
    with pytest.raises(PrometheusParseError):
        parse_prometheus("t2_orphan 1\n")  # no # TYPE
    with pytest.raises(PrometheusParseError):
        parse_prometheus("# TYPE t2_x gauge\nt2_x{a=\"1\"} one\n")
    with pytest.raises(PrometheusParseError):
        parse_prometheus('# TYPE t2_h histogram\nt2_h_bucket{le="1"} 5\nt2_h_bucket{le="+Inf"} 3\n'
                         "t2_h_sum 1\nt2_h_count 3\n")
    parsed = parse_prometheus('# HELP t2_c Things.\n# TYPE t2_c counter\nt2_c_total{k="a\\"b"} 2\n')
    assert parsed["t2_c"].samples == [("t2_c_total", {"k": 'a"b'}, 2.0)]


def _family(families, name):
    """The family of a metric, whether its # TYPE line names it with the _total suffix or without."""
    for candidate in (name, name.removesuffix("_total")):
        if candidate in families:
            return families[candidate]
    raise AssertionError(f"metric {name} missing; have {sorted(families)}")


def test_metrics_format_and_counters_move(base_url, client):
    response = http_request(base_url, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    before = parse_prometheus(response.text)
    resp = chat(client, "Name a fruit.", model=f"{BASE_MODEL}:math", max_tokens=6, extra_body={"ignore_eos": True})
    after = fetch_metrics(base_url)

    # A labelled counter with no observation yet may be left out entirely (the Prometheus client libraries
    # prune empty families), so cancellations are only type-checked when present: the disconnect and
    # timeout tests check that they move.
    for name in COUNTERS:
        if name == "t2_cancellations_total" and not any(n in after for n in (name, name[:-6])):
            continue
        assert _family(after, name).type == "counter", name
    for name in HISTOGRAMS:
        assert _family(after, name).type == "histogram", name
    for name in GAUGES:
        assert _family(after, name).type == "gauge", name

    def delta(sample, **labels):
        return metric_value(after, sample, **labels) - metric_value(before, sample, **labels)

    chat_ok = [labels for _, labels, _ in _family(after, "t2_requests_total").samples
               if "chat/completions" in labels.get("route", "") and labels.get("status") == "200"]
    assert chat_ok, "no t2_requests_total sample for the chat route with status 200"
    assert delta("t2_requests_total", **chat_ok[0]) == 1
    assert delta("t2_prompt_tokens_total") == resp.usage.prompt_tokens
    assert delta("t2_generated_tokens_total") == resp.usage.completion_tokens == 6
    assert delta("t2_requests_by_adaptation_total") == 1
    assert delta("t2_time_to_first_token_seconds_count") == 1
    assert delta("t2_request_duration_seconds_count") == 1
    assert delta("t2_queue_time_seconds_count") == 1
    assert delta("t2_inter_token_latency_seconds_count") >= 1
    assert delta("t2_time_to_first_token_seconds_sum") > 0
    # Idle again: nothing queued or running.
    assert metric_value(after, "t2_queue_depth") == 0
    assert metric_value(after, "t2_running_sequences") == 0


def test_openapi_document(base_url):
    resp = http_request(base_url, "GET", "/openapi.json")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert str(doc.get("openapi", "")).startswith("3."), doc.get("openapi")
    paths = doc["paths"]
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/experts", "/health", "/ready",
                 "/metrics"]:
        assert path in paths, (path, sorted(paths))
    assert "post" in paths["/v1/chat/completions"] and "post" in paths["/v1/completions"]
    assert "get" in paths["/v1/models"]


def test_docs_page(base_url):
    resp = http_request(base_url, "GET", "/docs")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "<html" in resp.text.lower()
    assert "openapi.json" in resp.text
