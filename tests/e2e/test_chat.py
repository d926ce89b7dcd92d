"""POST /v1/chat/completions: responses, streaming wire format, sampling parameters."""

from __future__ import annotations

import json
import math

import pytest

from t2_harness import BASE_MODEL, chat, collect_sse, extra_field, http_request, post_json

PROMPT = "Name three colors of the rainbow."
STORY_PROMPT = "Write a long story about a dragon who learns to bake bread."


def stream_text(client, **kwargs) -> tuple[str, list]:
    """Runs a streaming chat completion through the SDK; returns (concatenated content, chunks)."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_non_streaming_response_shape(client):
    resp = chat(client, PROMPT, max_tokens=12)
    assert resp.object == "chat.completion"
    assert resp.id and isinstance(resp.id, str)
    assert isinstance(resp.created, int) and resp.created > 1_600_000_000
    assert resp.model.startswith(BASE_MODEL)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    adaptation = extra_field(resp, "adaptation")
    assert adaptation["strategy"] == "none" and adaptation["mix"] == {}


def test_content_as_text_parts_equals_plain_string(client):
    plain = chat(client, PROMPT, max_tokens=10)
    parts = client.chat.completions.create(
        model=BASE_MODEL, max_tokens=10, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_system_and_assistant_turns_reach_the_prompt(client):
    single = chat(client, "And the third one?", max_tokens=4)
    conversation = client.chat.completions.create(
        model=BASE_MODEL, max_tokens=4, temperature=0,
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name two primary colors."},
            {"role": "assistant", "content": "Red and blue."},
            {"role": "user", "content": "And the third one?"},
        ])
    # The extra turns are rendered by the chat template, so the prompt must be longer by at least their text.
    assert conversation.usage.prompt_tokens >= single.usage.prompt_tokens + 10
    assert conversation.choices[0].message.content


def test_streaming_sdk_matches_non_streaming(client):
    expected = chat(client, PROMPT, max_tokens=12)
    text, chunks = stream_text(client, model=BASE_MODEL, max_tokens=12, temperature=0,
                               messages=[{"role": "user", "content": PROMPT}])
    assert text == expected.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streaming_wire_format(base_url):
    stream, events = collect_sse(base_url, "/v1/chat/completions", {
        "model": BASE_MODEL, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 10, "temperature": 0, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers.get("x-t2-mix") == "base"
    assert stream.headers.get("x-request-id")
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks, "no chunk before [DONE]"
    assert len({c["id"] for c in chunks}) == 1, "chunk ids differ"
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["created"], int)
        assert chunk["model"].startswith(BASE_MODEL)
        assert chunk["adaptation"]["strategy"] == "none"
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
        assert chunk.get("usage") is None  # usage only with stream_options.include_usage
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    finish = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1]), finish
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()


def test_stream_include_usage(base_url):
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": STORY_PROMPT}],
               "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = post_json(base_url, "/v1/chat/completions", request)
    assert plain.status == 200, plain
    plain = plain.json()
    _, events = collect_sse(base_url, "/v1/chat/completions",
                            {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    final = chunks[-1]
    assert final["choices"] == [], final
    assert final["id"] == chunks[0]["id"]
    usage = final["usage"]
    assert usage == plain["usage"], (usage, plain["usage"])
    assert usage["completion_tokens"] == 12  # ignore_eos: exactly max_tokens
    choice_chunks = chunks[:-1]
    assert all(c.get("usage") is None for c in choice_chunks)
    content_chunks = [c for c in choice_chunks if c["choices"][0]["delta"].get("content")]
    assert 1 <= len(content_chunks) <= usage["completion_tokens"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks) == \
        plain["choices"][0]["message"]["content"]
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_two_choices(client):
    resp = chat(client, PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in resp.choices)
    # OpenAI counts the tokens of every choice in completion_tokens.
    assert resp.usage.completion_tokens == 16


def test_n_two_streaming(base_url):
    _, events = collect_sse(base_url, "/v1/chat/completions", {
        "model": BASE_MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
        "temperature": 1.0, "seed": 3, "n": 2, "stream": True, "ignore_eos": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    by_index: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index.setdefault(choice["index"], []).append(choice)
    assert sorted(by_index) == [0, 1]
    for index, choices in by_index.items():
        assert choices[0]["delta"].get("role") == "assistant", index
        finishes = [c["finish_reason"] for c in choices if c["finish_reason"] is not None]
        assert finishes == ["length"], (index, finishes)
        assert choices[-1]["finish_reason"] == "length", index


def _stop_string_from(text: str) -> tuple[str, str]:
    """A short stop string taken from the middle of `text`, and the text before its first occurrence."""
    for start in range(len(text) // 3, len(text) - 3):
        candidate = text[start:start + 3]
        if candidate.strip() and text.find(candidate) > 0:
            return candidate, text[:text.find(candidate)]
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
def test_stop_strings(client, as_list):
    full = chat(client, STORY_PROMPT, max_tokens=24).choices[0].message.content
    stop, expected = _stop_string_from(full)
    stop_param = ["<never-generated>", stop] if as_list else stop
    resp = chat(client, STORY_PROMPT, max_tokens=24, stop=stop_param)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.message.content
    assert choice.message.content == expected, (stop, full)


def test_stop_string_while_streaming(client):
    full = chat(client, STORY_PROMPT, max_tokens=24).choices[0].message.content
    stop, expected = _stop_string_from(full)
    text, chunks = stream_text(client, model=BASE_MODEL, max_tokens=24, temperature=0, stop=stop,
                               messages=[{"role": "user", "content": STORY_PROMPT}])
    # Streaming must hold back a partial match instead of sending text that later turns out to be the stop.
    assert text == expected, (stop, full)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible_at_temperature_one(client):
    def sample(seed):
        return chat(client, STORY_PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                    extra_body={"ignore_eos": True}).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    others = [sample(seed) for seed in (1, 2, 3)]
    assert any(text != first for text in others), "different seeds all gave the same text"


def test_temperature_zero_is_deterministic(client):
    runs = [chat(client, STORY_PROMPT, max_tokens=12, temperature=0, logprobs=True) for _ in range(2)]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content
    lp = [[t.logprob for t in r.choices[0].logprobs.content] for r in runs]
    assert lp[0] == lp[1]


def test_top_k_one_and_tiny_top_p_are_greedy(client):
    greedy = chat(client, STORY_PROMPT, max_tokens=10, extra_body={"ignore_eos": True}).choices[0].message.content
    top_k_1 = chat(client, STORY_PROMPT, max_tokens=10, temperature=1.5, seed=5,
                   extra_body={"top_k": 1, "ignore_eos": True}).choices[0].message.content
    top_p_tiny = chat(client, STORY_PROMPT, max_tokens=10, temperature=1.5, seed=5, top_p=1e-6,
                      extra_body={"ignore_eos": True}).choices[0].message.content
    assert top_k_1 == greedy
    assert top_p_tiny == greedy


def test_logprobs_and_top_logprobs(client):
    resp = chat(client, PROMPT, max_tokens=8, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 8
    for entry in entries:
        assert entry.logprob <= 0.0 and math.isfinite(entry.logprob)
        alternatives = entry.top_logprobs
        assert len(alternatives) == 5
        values = [a.logprob for a in alternatives]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values)
        assert len({a.token for a in alternatives}) == 5
        # Greedy: the chosen token is the most likely one.
        assert entry.token == alternatives[0].token
        assert entry.logprob == pytest.approx(alternatives[0].logprob, abs=1e-4)
    assert "".join(e.token for e in entries) == choice.message.content


def test_logprobs_bytes_rebuild_multibyte_text(client):
    # Emoji take several tokens each, and a token can be part of one character. OpenAI's `bytes` field carries
    # each token's raw UTF-8 bytes so that clients can rebuild such characters: concatenated, they must
    # equal the content exactly (a replacement character's bytes, EF BF BD, in their place would not).
    resp = chat(client, "Write the word hello followed by a waving hand emoji.", max_tokens=12, logprobs=True,
                top_logprobs=2)
    content = resp.choices[0].message.content
    assert "\ufffd" not in content, f"the prompt no longer ends on a whole character: {content!r}"
    assert len(content.encode()) > len(content), f"the prompt no longer produces non-ASCII text: {content!r}"
    entries = resp.choices[0].logprobs.content
    rebuilt = b"".join(bytes(entry.bytes) for entry in entries)
    assert rebuilt == content.encode(), (rebuilt, content, [e.bytes for e in entries])
    for entry in entries:
        for alternative in entry.top_logprobs:
            if "\ufffd" not in alternative.token:
                assert bytes(alternative.bytes) == alternative.token.encode(), alternative


# OpenAI's schema lets these optional fields be null, meaning "not given"; some clients send them so.
NULLABLE_FIELDS = ["logprobs", "stream", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "top_logprobs", "stream_options", "max_completion_tokens"]


@pytest.mark.parametrize("field", NULLABLE_FIELDS)
def test_null_optional_field_means_absent(base_url, field):
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
               field: None}
    resp = post_json(base_url, "/v1/chat/completions", request)
    assert resp.status == 200, resp
    assert resp.json()["object"] == "chat.completion"  # not a stream: stream null means false


def test_logprobs_without_top_logprobs(client):
    resp = chat(client, PROMPT, max_tokens=4, logprobs=True)
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens
    assert all(e.logprob <= 0.0 and e.top_logprobs == [] for e in entries)


def test_no_logprobs_unless_asked(client):
    assert chat(client, PROMPT, max_tokens=4).choices[0].logprobs is None


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_finish_reason_length(client, field):
    resp = client.chat.completions.create(model=BASE_MODEL, temperature=0, **{field: 5},
                                          messages=[{"role": "user", "content": STORY_PROMPT}])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_ignore_eos_generates_exactly_max_tokens(client):
    # "Say OK." normally ends after a couple of tokens; ignore_eos keeps generating.
    short = chat(client, "Reply with just the word OK.", max_tokens=20)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    forced = chat(client, "Reply with just the word OK.", max_tokens=20, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 20
    assert forced.choices[0].finish_reason == "length"


def test_penalties_accepted_and_change_output(client):
    prompt = "Repeat the word 'apple' ten times, separated by spaces."
    plain = chat(client, prompt, max_tokens=24).choices[0].message.content
    penalized = chat(client, prompt, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalized.choices[0].message.content != plain
    mild = chat(client, prompt, max_tokens=24, presence_penalty=-0.5, frequency_penalty=0.5)
    assert mild.choices[0].message.content


def test_user_field_is_accepted(client):
    with_user = chat(client, PROMPT, max_tokens=6, user="e2e-test-user")
    assert with_user.choices[0].message.content == chat(client, PROMPT, max_tokens=6).choices[0].message.content


def test_request_id_header(base_url, client):
    payload = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    echoed = post_json(base_url, "/v1/chat/completions", payload, headers={"x-request-id": "e2e-abc-123"})
    assert echoed.status == 200 and echoed.headers.get("x-request-id") == "e2e-abc-123"
    generated = [post_json(base_url, "/v1/chat/completions", payload).headers.get("x-request-id") for _ in range(2)]
    assert all(generated) and generated[0] != generated[1], generated
    # Errors and other routes carry one too.
    assert http_request(base_url, "GET", "/v1/models", headers={"X-Request-Id": "models-1"}).headers.get(
        "x-request-id") == "models-1"
    bad = post_json(base_url, "/v1/chat/completions", {**payload, "model": "no-such-model"},
                    headers={"x-request-id": "err-1"})
    assert bad.status == 404 and bad.headers.get("x-request-id") == "err-1"
    raw = client.chat.completions.with_raw_response.create(
        model=BASE_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"x-request-id": "sdk-7"})
    assert raw.headers.get("x-request-id") == "sdk-7"


def test_logit_bias_forces_a_token_and_is_checked(client, base_url):
    def tokens(bias):
        r = client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=6, temperature=0, logprobs=True, logit_bias=bias)
        return [t.token for t in r.choices[0].logprobs.content]

    plain = tokens(None)
    forced_a, forced_b = tokens({"1000": 100}), tokens({"2000": 100})
    # +100 makes one token win every step: six times the same token, a different one per id.
    assert len(set(forced_a)) == 1 and len(forced_a) == 6, forced_a
    assert len(set(forced_b)) == 1 and forced_a[0] != forced_b[0]
    # The bias is what changed the answer.
    assert forced_a != plain
    for bias in ({"abc": 1}, {"99999999": 1}, {"5": 101}, {"5": "x"}):
        r = post_json(base_url, "/v1/chat/completions", {"model": BASE_MODEL, "max_tokens": 2, "logit_bias": bias,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 400 and r.json()["error"]["param"] == "logit_bias", (bias, r)
