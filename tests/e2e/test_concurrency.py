"""Many streams at once (batched generation, mixed adaptations) and clients that go away mid-stream."""

from __future__ import annotations

import threading
import time

from t2_harness import BASE_MODEL, STORED_MIX_NAME, SseStream, chat, fetch_metrics, http_request, metric_value

STREAMS = 16
MAX_TOKENS = 12
# Requests with different adaptations share one batch; each must still get exactly its own output.
MODELS = [BASE_MODEL, f"{BASE_MODEL}:math", f"{BASE_MODEL}:code", f"{BASE_MODEL}:{STORED_MIX_NAME}"]
TOPICS = ["rivers", "volcanoes", "owls", "bicycles", "tea", "glaciers", "chess", "bees",
          "lighthouses", "comets", "coral", "violins", "deserts", "maps", "bridges", "clocks"]


def request_args(i: int) -> dict:
    return dict(model=MODELS[i % len(MODELS)], max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": f"Tell me one fact about {TOPICS[i]}."}],
                extra_body={"ignore_eos": True})


def test_concurrent_streams_match_sequential_results(client):
    sequential = [client.chat.completions.create(**request_args(i)).choices[0].message.content
                  for i in range(STREAMS)]

    results: list[dict | None] = [None] * STREAMS
    start = threading.Barrier(STREAMS)

    def run(i: int) -> None:
        record = {"chunks": [], "first_content_at": None, "error": None}
        try:
            start.wait(timeout=30)
            for chunk in client.chat.completions.create(stream=True, **request_args(i)):
                record["chunks"].append(chunk)
                if record["first_content_at"] is None and chunk.choices and chunk.choices[0].delta.content:
                    record["first_content_at"] = time.monotonic()
            record["done_at"] = time.monotonic()
        except Exception as err:  # reported by the main thread
            record["error"] = repr(err)
        results[i] = record

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "some streams did not finish within 300 s"

    for i, record in enumerate(results):
        assert record["error"] is None, (i, record["error"])
        chunks = record["chunks"]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == sequential[i], (i, MODELS[i % len(MODELS)], text, sequential[i])
        assert chunks[-1].choices[0].finish_reason == "length", i
        assert len({c.id for c in chunks}) == 1, i
    assert len({r["chunks"][0].id for r in results}) == STREAMS, "streams share a completion id"

    # Batching: most streams must have had their first token before the first stream finished
    # (a server that ran them one after another would give one).
    first_finish = min(r["done_at"] for r in results)
    overlapping = sum(1 for r in results if r["first_content_at"] < first_finish)
    assert overlapping >= STREAMS // 2, f"only {overlapping} of {STREAMS} streams were in flight together"


def _wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_client_disconnect_mid_stream_cancels_generation(base_url, client):
    before = metric_value(fetch_metrics(base_url), "t2_cancellations_total", reason="disconnect")
    stream = SseStream(base_url, "/v1/chat/completions", {
        "model": BASE_MODEL, "messages": [{"role": "user", "content": "Write a very long essay about rain."}],
        "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True})
    assert stream.status == 200
    events = stream.events()
    for _ in range(3):
        assert next(events) != "[DONE]"
    stream.abort()

    def cancelled():
        return metric_value(fetch_metrics(base_url), "t2_cancellations_total", reason="disconnect") >= before + 1

    assert _wait_for(cancelled, timeout=20), "t2_cancellations_total{reason=\"disconnect\"} did not increase"
    # 400 tokens would take ~20 s: a server that kept generating would still show the sequence running.
    assert _wait_for(lambda: metric_value(fetch_metrics(base_url), "t2_running_sequences") == 0, timeout=5)
    assert http_request(base_url, "GET", "/health").status == 200
    assert chat(client, "Say hi.", max_tokens=3).choices[0].message.content
