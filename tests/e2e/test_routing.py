"""Pass-1 routing over real HTTP: `<model>:auto` and the prompt / classifier strategies, hard and soft
policies, what the response reports (strategy, label, scores, final mix, pass-1 time), that pass 2 answers
exactly as the decided expert would, streaming, metrics, and refusals."""

from __future__ import annotations

import shutil

import pytest

from t2_harness import (BASE_MODEL, EXPERTS, ServerProcess, assert_openai_error, collect_sse, extra_field,
                        fetch_metrics, make_client, metric_value, parse_mix_header, post_json, run_t2)

MATH = "What is 17 times 23? Answer with the number only."
MAX_TOKENS = 8


def ask(client, prompt=MATH, model=BASE_MODEL, adaptation=None, **kw):
    extra = {"ignore_eos": True}
    if adaptation is not None:
        extra["adaptation"] = adaptation
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body=extra, **kw)


def check_decision(reported: dict, strategy: str, labels: set[str]) -> None:
    assert reported["strategy"] == strategy, reported
    scores = reported["scores"]
    assert set(scores) == labels, reported
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4), scores
    assert reported["label"] == max(scores, key=scores.get), reported
    assert reported["pass1_ms"] > 0, reported
    assert reported["policy"] in ("hard", "soft"), reported


# The suite's experts are `math` and `code` (categories of the same names), so pass 1 has these labels.
LABELS = set(EXPERTS) | {"other"}


def expected_hard_mix(label: str) -> dict:
    return {} if label == "other" else {label: 1.0}


@pytest.mark.parametrize("prompt", [MATH, "Write a Python function that reverses a string.",
                                    "Tell me a short story about a cat."])
def test_auto_routes_and_pass2_answers_as_the_chosen_expert(client, prompt):
    raw = ask(client, prompt, model=f"{BASE_MODEL}:auto")
    assert raw.status_code == 200
    reported = extra_field(raw.parse(), "adaptation")
    # No classifier expert in this store: auto falls back to prompt routing and says so.
    check_decision(reported, "prompt", LABELS)
    assert "classifier" in reported.get("note", ""), reported
    assert reported["mix"] == expected_hard_mix(reported["label"])
    kind, weights = parse_mix_header(raw.headers["x-t2-mix"])
    assert weights == pytest.approx(reported["mix"]), raw.headers["x-t2-mix"]
    # Pass 2 must be exactly the decided adaptation's answer.
    label = reported["label"]
    direct = ask(client, prompt, model=f"{BASE_MODEL}:{label}" if label != "other" else f"{BASE_MODEL}:base")
    assert raw.parse().choices[0].message.content == direct.parse().choices[0].message.content


def test_prompt_strategy_by_body_and_soft_policy(client):
    hard = extra_field(ask(client, adaptation={"strategy": "prompt"}).parse(), "adaptation")
    check_decision(hard, "prompt", LABELS)
    assert hard["policy"] == "hard"
    soft = extra_field(ask(client, adaptation={"strategy": "prompt", "policy": "soft"}).parse(), "adaptation")
    check_decision(soft, "prompt", LABELS)
    assert soft["policy"] == "soft"
    assert soft["scores"] == pytest.approx(hard["scores"], abs=1e-4)
    # α = the label probabilities (the base model's share under "base"), rounded to 0.01.
    for label, p in soft["scores"].items():
        key = "base" if label == "other" else label
        assert soft["mix"].get(key, 0.0) == pytest.approx(p, abs=0.006), soft


def test_threshold_falls_back_to_base(client):
    reported = extra_field(ask(client, adaptation={"strategy": "prompt", "threshold": 1.0}).parse(), "adaptation")
    assert reported["mix"] == {}, reported
    assert "threshold" in reported["note"], reported


def test_streamed_chunks_carry_the_decision(base_url):
    payload = {"model": f"{BASE_MODEL}:auto", "messages": [{"role": "user", "content": MATH}],
               "max_tokens": 4, "temperature": 0, "stream": True}
    stream, events = collect_sse(base_url, "/v1/chat/completions", payload)
    assert events[-1] == "[DONE]"
    import json
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks
    for c in chunks:
        check_decision(c["adaptation"], "prompt", LABELS)
        assert c["adaptation"] == chunks[0]["adaptation"]
    assert stream.headers["x-t2-mix"] != "prompt", "the header names the decided mix"


def test_routing_metrics_count_decisions_and_pass1_time(client, base_url):
    before = fetch_metrics(base_url)
    reported = extra_field(ask(client, model=f"{BASE_MODEL}:auto").parse(), "adaptation")
    after = fetch_metrics(base_url)
    name = "t2_routing_decisions_total"
    labels = {"strategy": "prompt", "label": reported["label"]}
    assert metric_value(after, name, **labels) == metric_value(before, name, **labels) + 1
    assert metric_value(after, "t2_pass1_seconds_count") == metric_value(before, "t2_pass1_seconds_count") + 1
    assert metric_value(after, "t2_pass1_seconds_sum") > metric_value(before, "t2_pass1_seconds_sum")


@pytest.mark.parametrize("adaptation, message", [
    ({"strategy": "classifier"}, "classifier expert"),
    ({"strategy": "prompt", "policy": "fuzzy"}, "'hard' or 'soft'"),
    ({"strategy": "prompt", "threshold": 1.5}, "between 0 and 1"),
    ({"strategy": "expert", "expert": "math", "policy": "soft"}, "apply to routing"),
    ({"strategy": "prompt", "expert": "math"}, "takes no expert"),
])
def test_bad_routing_requests_are_refused(base_url, adaptation, message):
    resp = post_json(base_url, "/v1/chat/completions", {
        "model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "adaptation": adaptation})
    error = assert_openai_error(resp, 400, param="adaptation")
    assert message in error["message"], error


@pytest.fixture(scope="module")
def classifier_server(experts_dir, log_dir, tmp_path_factory):
    """A server whose store also holds a classifier expert (category `routing`) and routes by default."""
    path = tmp_path_factory.mktemp("experts-with-router")
    shutil.copytree(experts_dir, path, dirs_exist_ok=True)
    run_t2("experts", "synth", "--experts-dir", str(path), "--name", "router", "--seed", "7",
           "--category", "routing")
    proc = ServerProcess(path, log_dir, ["--default-adaptation", "auto", "--route-policy", "soft"],
                         name="classifier").start()
    yield proc
    proc.stop()


def test_classifier_strategy_and_routing_default(classifier_server):
    client = make_client(classifier_server)
    try:
        # The plain model id routes (server default: auto → classifier, soft).
        reported = extra_field(ask(client).parse(), "adaptation")
        check_decision(reported, "classifier", LABELS)
        assert reported["policy"] == "soft"
        # The classifier expert's scores differ from the base model's prompt routing.
        prompt = extra_field(ask(client, adaptation={"strategy": "prompt"}).parse(), "adaptation")
        check_decision(prompt, "prompt", LABELS)
        assert reported["scores"] != pytest.approx(prompt["scores"], abs=1e-3)
        # The router is not a pass-2 label.
        assert "router" not in reported["mix"]
    finally:
        client.close()


def test_routing_without_experts_is_refused(log_dir, tmp_path):
    proc = ServerProcess(tmp_path, log_dir, name="no-experts").start()
    try:
        resp = post_json(proc.base_url, "/v1/chat/completions", {
            "model": f"{BASE_MODEL}:auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        error = assert_openai_error(resp, 400, param="adaptation")
        assert "no experts" in error["message"], error
        resp = post_json(proc.base_url, "/v1/adaptations", {
            "name": "x", "examples": [{"prompt": "1+1?", "verifier": "number", "answer": 2}] * 2})
        # The server's state, not the request, is what is wrong: 409 (the OpenAPI document says so).
        error = assert_openai_error(resp, 409, code="no_experts")
        assert "no experts" in error["message"], error
    finally:
        proc.stop()
