"""POST /v1/completions (plain text prompt, no chat template)."""

from __future__ import annotations

import json

from t2_harness import BASE_MODEL, collect_sse, post_json

PROMPT = "The capital of France is"


def test_completion_basic(client):
    resp = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert resp.object == "text_completion"
    assert resp.id and resp.model.startswith(BASE_MODEL)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert isinstance(choice.text, str) and choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_has_no_chat_template(client):
    completion = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    chat = client.chat.completions.create(model=BASE_MODEL, max_tokens=1, temperature=0,
                                          messages=[{"role": "user", "content": PROMPT}])
    # The chat template wraps the same text in role markers, so it must be longer.
    assert completion.usage.prompt_tokens < chat.usage.prompt_tokens


def test_prompt_list_of_one_string_equals_string(base_url):
    request = {"model": BASE_MODEL, "max_tokens": 8, "temperature": 0}
    as_string = post_json(base_url, "/v1/completions", {**request, "prompt": PROMPT})
    as_list = post_json(base_url, "/v1/completions", {**request, "prompt": [PROMPT]})
    assert as_string.status == 200 and as_list.status == 200, (as_string, as_list)
    assert as_list.json()["choices"][0]["text"] == as_string.json()["choices"][0]["text"]
    assert as_list.json()["usage"] == as_string.json()["usage"]


def test_completion_stream(base_url, client):
    expected = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    stream, events = collect_sse(base_url, "/v1/completions", {
        "model": BASE_MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [], usage_chunk
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        expected.usage.prompt_tokens, 8, expected.usage.total_tokens)
    text_chunks = chunks[:-1]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == expected.choices[0].text
    finishes = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1]), finishes


def test_completion_stream_via_sdk(client):
    chunks = list(client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                            stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert text == expected.choices[0].text
