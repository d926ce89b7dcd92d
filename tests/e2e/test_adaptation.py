"""Expert selection (model suffixes and the `adaptation` body field), /v1/models and /v1/experts."""

from __future__ import annotations

import json

import pytest

from t2_harness import (BASE_MODEL, EXPERTS, STORED_MIX, STORED_MIX_NAME, SseStream, extra_field, http_request,
                        parse_mix_header)

PROMPT = "Explain in one sentence why the sky is blue."
MAX_TOKENS = 16

# (test id, model, `adaptation` body field or None, expected strategy (or a tuple of allowed ones),
#  expected mix weights, expected x-t2-mix)
# An expected header of None means only its kind is checked (the spec gives no exact form).
SELECTION_FORMS = [
    ("plain-base", BASE_MODEL, None, "none", {}, "base"),
    ("suffix-base", f"{BASE_MODEL}:base", None, "none", {}, "base"),
    ("strategy-none", BASE_MODEL, {"strategy": "none"}, "none", {}, "base"),
    ("suffix-expert", f"{BASE_MODEL}:math", None, "expert", {"math": 1.0}, "expert:math"),
    ("body-expert", BASE_MODEL, {"expert": "code"}, "expert", {"code": 1.0}, "expert:code"),
    # A stored mix may report itself as a plain mix or by its name as a "profile".
    ("suffix-stored-mix", f"{BASE_MODEL}:{STORED_MIX_NAME}", None, ("mix", "profile"), STORED_MIX, None),
    ("body-mix", BASE_MODEL, {"mix": {"math": 0.7, "code": 0.3}}, "mix", {"math": 0.7, "code": 0.3},
     "mix:code=0.3,math=0.7"),
]


def greedy(client, model=BASE_MODEL, adaptation=None, prompt=PROMPT, logprobs=False):
    extra = {"ignore_eos": True}
    if adaptation is not None:
        extra["adaptation"] = adaptation
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
        logprobs=logprobs, extra_body=extra)


def text_of(raw) -> str:
    return raw.parse().choices[0].message.content


def logprobs_of(raw) -> list[float]:
    return [t.logprob for t in raw.parse().choices[0].logprobs.content]


@pytest.mark.parametrize("form", SELECTION_FORMS, ids=[f[0] for f in SELECTION_FORMS])
def test_selection_form_reported_in_body_and_header(client, form):
    _, model, adaptation, strategy, mix, header = form
    raw = greedy(client, model=model, adaptation=adaptation)
    assert raw.status_code == 200
    body = raw.parse()
    reported = extra_field(body, "adaptation")
    if isinstance(strategy, tuple):
        assert reported["strategy"] in strategy, reported
        if reported["strategy"] == "profile":
            assert reported.get("profile") == STORED_MIX_NAME, reported
    else:
        assert reported["strategy"] == strategy, reported
    assert set(reported["mix"]) == set(mix), reported
    for name, weight in mix.items():
        assert reported["mix"][name] == pytest.approx(weight, abs=1e-6), reported
    assert "scores" in reported and reported["scores"] is None, reported
    mix_header = raw.headers.get("x-t2-mix")
    assert mix_header, "no x-t2-mix header"
    if header is not None:
        assert mix_header == header
    else:
        kind, weights = parse_mix_header(mix_header)
        assert kind == "mix" and weights == pytest.approx(mix), mix_header
    assert body.choices[0].message.content


def test_auto_is_accepted(client):
    raw = greedy(client, model=f"{BASE_MODEL}:auto")
    assert raw.status_code == 200
    reported = extra_field(raw.parse(), "adaptation")
    # `auto` runs pass 1 (see test_routing.py): the response names the strategy that decided.
    assert reported["strategy"] in ("prompt", "classifier"), reported
    assert isinstance(reported["mix"], dict) and isinstance(reported["scores"], dict), reported
    assert raw.headers.get("x-t2-mix")
    assert text_of(raw)


def test_experts_change_greedy_output_and_base_suffix_does_not(client):
    base = greedy(client, logprobs=True)
    base_suffix = greedy(client, model=f"{BASE_MODEL}:base", logprobs=True)
    assert text_of(base_suffix) == text_of(base)
    assert logprobs_of(base_suffix) == logprobs_of(base)
    for expert in EXPERTS:
        adapted = greedy(client, model=f"{BASE_MODEL}:{expert}", logprobs=True)
        # The logprobs prove the weights changed at all; the text proves the change is large enough to matter.
        assert logprobs_of(adapted) != logprobs_of(base), expert
        assert text_of(adapted) != text_of(base), expert


def test_equivalent_forms_give_identical_output(client):
    by_suffix = greedy(client, model=f"{BASE_MODEL}:math", logprobs=True)
    by_body = greedy(client, adaptation={"expert": "math"}, logprobs=True)
    assert text_of(by_body) == text_of(by_suffix)
    assert logprobs_of(by_body) == pytest.approx(logprobs_of(by_suffix), abs=1e-5)
    stored = greedy(client, model=f"{BASE_MODEL}:{STORED_MIX_NAME}", logprobs=True)
    inline = greedy(client, adaptation={"mix": dict(STORED_MIX)}, logprobs=True)
    assert text_of(inline) == text_of(stored)
    assert logprobs_of(inline) == pytest.approx(logprobs_of(stored), abs=1e-5)
    base = greedy(client, logprobs=True)
    assert logprobs_of(stored) != logprobs_of(base)


def test_stream_chunks_carry_adaptation(base_url):
    stream = SseStream(base_url, "/v1/chat/completions", {
        "model": f"{BASE_MODEL}:code", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4, "temperature": 0, "stream": True})
    try:
        assert stream.status == 200
        assert stream.headers.get("x-t2-mix") == "expert:code"
        events = list(stream.events())
    finally:
        stream.close()
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert chunk["adaptation"]["strategy"] == "expert", chunk
        assert chunk["adaptation"]["mix"] == {"code": pytest.approx(1.0)}, chunk


def test_completions_route_applies_adaptation(client):
    def complete(model):
        return client.completions.create(model=model, prompt="The three laws of motion are", max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    assert complete(f"{BASE_MODEL}:math") != complete(BASE_MODEL)


def test_models_list(base_url, client):
    resp = http_request(base_url, "GET", "/v1/models")
    assert resp.status == 200
    body = resp.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    expected_children = {f"{BASE_MODEL}:{suffix}"
                         for suffix in ["base", "auto", STORED_MIX_NAME, *EXPERTS]}
    assert {BASE_MODEL, *expected_children} <= set(cards), sorted(cards)
    for model_id, card in cards.items():
        assert card["object"] == "model", card
        assert isinstance(card.get("created"), int), card
        assert isinstance(card.get("owned_by"), str), card
    for child in expected_children:
        assert cards[child]["parent"] == BASE_MODEL, cards[child]
    assert cards[BASE_MODEL].get("parent") is None
    # The SDK reads the same list.
    assert {m.id for m in client.models.list()} == set(cards)


def test_experts_list(base_url):
    resp = http_request(base_url, "GET", "/v1/experts")
    assert resp.status == 200
    body = resp.json()
    assert body["object"] == "list"
    experts = {e["name"]: e for e in body["data"]}
    assert set(EXPERTS) <= set(experts), body
    for name in EXPERTS:
        assert isinstance(experts[name]["description"], str), experts[name]
        assert experts[name]["category"] == name, experts[name]  # conftest gives each its name as category
    mix_names = [m if isinstance(m, str) else m.get("name") for m in body["mixes"]]
    assert STORED_MIX_NAME in mix_names, body["mixes"]
