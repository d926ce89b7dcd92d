"""Behaviour that needs a server with other flags: limits, API keys, timeouts, graceful shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest

from t2_harness import (BASE_MODEL, ServerProcess, SseStream, assert_openai_error, fetch_metrics, http_request,
                        make_client, metric_value, post_json)

LONG_REQUEST = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Write a poem about the sea."}],
                "max_tokens": 32, "temperature": 0, "ignore_eos": True}

# The limited server: one start covers several flags. Its key comes from the environment (T2_API_KEY);
# the queue test's server takes one by --api-key.
ENV_KEY = "e2e-env-key"
LIMITED_FLAGS = ["--default-max-tokens", "3", "--max-n", "2", "--max-body-bytes", "8192",
                 "--request-timeout-s", "3"]


@pytest.fixture(scope="module")
def limited_server(experts_dir, log_dir):
    proc = ServerProcess(experts_dir, log_dir, LIMITED_FLAGS, env={"T2_API_KEY": ENV_KEY}, name="limited").start()
    yield proc
    proc.stop()


AUTH = {"Authorization": f"Bearer {ENV_KEY}"}


def test_queue_overflow_gives_429_with_retry_after(start_server):
    key = "e2e-flag-key"
    server = start_server("--max-queue", "1", "--max-batch", "1", "--api-key", key, name="queue")
    auth = {"Authorization": f"Bearer {key}"}
    assert_openai_error(http_request(server.base_url, "GET", "/v1/models"), 401)  # --api-key is enforced
    requests = 6
    responses: list = [None] * requests
    start = threading.Barrier(requests)

    def send(i: int) -> None:
        start.wait(timeout=30)
        began = time.monotonic()
        try:
            responses[i] = (post_json(server.base_url, "/v1/chat/completions", LONG_REQUEST, headers=auth),
                            time.monotonic() - began)
        except Exception as err:  # reported below
            responses[i] = (err, time.monotonic() - began)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    errors = [r[0] for r in responses if isinstance(r[0], Exception)]
    assert not errors, errors
    statuses = sorted(r[0].status for r in responses)
    # At most one request runs and one waits in the queue (the first may already be running or still queued
    # when the second arrives); all six are sent within milliseconds, long before the first can finish.
    assert set(statuses) <= {200, 429}, statuses
    assert 1 <= statuses.count(200) <= 2 and statuses.count(429) >= 4, statuses
    for resp, elapsed in responses:
        if resp.status == 429:
            assert_openai_error(resp, 429)
            retry_after = resp.headers.get("retry-after")
            assert retry_after is not None and retry_after.isdigit(), resp.headers
            assert elapsed < 5.0, f"429 took {elapsed:.1f} s: rejected requests must not wait"
        else:
            assert resp.json()["usage"]["completion_tokens"] == 32
    assert http_request(server.base_url, "GET", "/health").status == 200


def test_api_key_from_environment_is_enforced(limited_server):
    server = limited_server
    payload = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": ENV_KEY}):
        assert_openai_error(http_request(server.base_url, "GET", "/v1/models", headers=headers), 401)
        assert_openai_error(post_json(server.base_url, "/v1/chat/completions", payload, headers=headers), 401)
        assert_openai_error(post_json(server.base_url, "/v1/completions",
                                      {"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 2}, headers=headers), 401)
        assert_openai_error(http_request(server.base_url, "GET", "/v1/experts", headers=headers), 401)
    assert http_request(server.base_url, "GET", "/v1/models", headers=AUTH).status == 200
    assert post_json(server.base_url, "/v1/chat/completions", payload, headers=AUTH).status == 200
    for path in ("/health", "/ready", "/metrics"):
        assert http_request(server.base_url, "GET", path).status == 200, path

    with make_client(server, api_key="wrong-key") as wrong_client, pytest.raises(openai.AuthenticationError):
        wrong_client.models.list()
    with make_client(server, api_key=ENV_KEY) as good_client:
        reply = good_client.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_default_max_tokens_applies_without_max_tokens(limited_server):
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Write a long poem."}],
               "temperature": 0, "ignore_eos": True}
    resp = post_json(limited_server.base_url, "/v1/chat/completions", request, headers=AUTH)
    assert resp.status == 200, resp
    assert resp.json()["usage"]["completion_tokens"] == 3
    assert resp.json()["choices"][0]["finish_reason"] == "length"


def test_max_n_flag(limited_server):
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
               "temperature": 1.0}
    ok = post_json(limited_server.base_url, "/v1/chat/completions", {**request, "n": 2}, headers=AUTH)
    assert ok.status == 200 and len(ok.json()["choices"]) == 2, ok
    assert_openai_error(post_json(limited_server.base_url, "/v1/chat/completions", {**request, "n": 3},
                                  headers=AUTH), 400)


def test_max_body_bytes_flag(limited_server):
    request = {"model": BASE_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 9000}]}
    assert_openai_error(post_json(limited_server.base_url, "/v1/chat/completions", request, headers=AUTH), 413)
    request["messages"][0]["content"] = "x" * 100
    assert post_json(limited_server.base_url, "/v1/chat/completions", request, headers=AUTH).status == 200


def test_request_timeout_cancels_generation(limited_server):
    server = limited_server
    before = metric_value(fetch_metrics(server.base_url), "t2_cancellations_total", reason="timeout")
    began = time.monotonic()
    # ~400 tokens take ~20 s; the server must cut the request off after its 3 s limit.
    stream = SseStream(server.base_url, "/v1/chat/completions",
                       {**LONG_REQUEST, "max_tokens": 400, "stream": True}, headers=AUTH)
    try:
        if stream.status == 200:
            events = list(stream.events())
            assert events, "stream closed without any event"
        else:
            stream.read_body()
    finally:
        stream.close()
    elapsed = time.monotonic() - began
    assert elapsed < 15, f"request ran {elapsed:.1f} s despite --request-timeout-s 3"
    after = metric_value(fetch_metrics(server.base_url), "t2_cancellations_total", reason="timeout")
    assert after == before + 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_stream_then_exits_zero(start_server, sig):
    server = start_server("--shutdown-timeout-s", "30", name="drain")
    stream = SseStream(server.base_url, "/v1/chat/completions",
                       {**LONG_REQUEST, "stream": True, "stream_options": {"include_usage": True}})
    try:
        assert stream.status == 200
        events = stream.events()
        first = next(events)
        assert first != "[DONE]"
        server.signal(sig)
        signalled_at = time.monotonic()

        # While draining, new connections must not be served.
        time.sleep(0.5)
        try:
            late = http_request(server.base_url, "GET", "/health", timeout=5)
            assert late.status != 200, "a new request was served after the signal"
        except OSError:
            pass  # refused, reset or never answered (timeout): all mean "not accepting"

        rest = list(events)
    finally:
        stream.close()
    assert rest and rest[-1] == "[DONE]", rest[-3:]
    chunks = [json.loads(first)] + [json.loads(e) for e in rest[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length", finishes
    assert chunks[-1]["usage"]["completion_tokens"] == 32

    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("server did not exit within 30 s of finishing the drained stream")
    assert code == 0, f"exit code {code}"
    assert time.monotonic() - signalled_at < 45
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
