"""Error responses: status codes and the OpenAI error body {"error": {message, type, param, code}}."""

from __future__ import annotations

import http.client
import urllib.parse

import openai
import pytest

from t2_harness import BASE_MODEL, Response, assert_openai_error, http_request, post_json

CHAT = "/v1/chat/completions"


def chat_request(**overrides) -> dict:
    request = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    request.update(overrides)
    return request


@pytest.mark.parametrize("model", ["no-such-model", f"{BASE_MODEL}:no-such-expert", "gpt-4o"])
def test_unknown_model_is_404(base_url, model):
    resp = post_json(base_url, CHAT, chat_request(model=model))
    assert_openai_error(resp, 404, code="model_not_found")
    completion = post_json(base_url, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})
    assert_openai_error(completion, 404, code="model_not_found")


def test_unknown_model_raises_not_found_in_sdk(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


INVALID_PARAMS = [
    ("temperature-5", {"temperature": 5}),
    ("temperature-negative", {"temperature": -0.5}),
    ("top-p-above-1", {"top_p": 1.5}),
    ("n-0", {"n": 0}),
    ("n-above-max-n", {"n": 9}),
    ("top-logprobs-50", {"logprobs": True, "top_logprobs": 50}),
    ("stop-5-strings", {"stop": ["a", "b", "c", "d", "e"]}),
    ("presence-penalty-3", {"presence_penalty": 3}),
    ("frequency-penalty-minus-3", {"frequency_penalty": -3}),
    ("max-tokens-negative", {"max_tokens": -1}),
    ("temperature-string", {"temperature": "hot"}),
    ("messages-missing", {"messages": None}),
    ("messages-empty", {"messages": []}),
    ("messages-not-a-list", {"messages": "Hi"}),
    ("unknown-role", {"messages": [{"role": "wizard", "content": "Hi"}]}),
]


@pytest.mark.parametrize("overrides", [p[1] for p in INVALID_PARAMS], ids=[p[0] for p in INVALID_PARAMS])
def test_invalid_params_are_400(base_url, overrides):
    request = chat_request(**overrides)
    request = {k: v for k, v in request.items() if v is not None}
    assert_openai_error(post_json(base_url, CHAT, request), 400)


def test_invalid_param_raises_bad_request_in_sdk(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=5)
    assert caught.value.status_code == 400


@pytest.mark.parametrize("adaptation", [{"expert": "no-such-expert"}, {"mix": {"math": 0.5, "nope": 0.5}}],
                         ids=["expert", "mix"])
def test_unknown_expert_in_adaptation_is_400(base_url, adaptation):
    resp = post_json(base_url, CHAT, chat_request(adaptation=adaptation))
    assert_openai_error(resp, 400, param="adaptation")


@pytest.mark.parametrize("body", [b'{"model": "x", "messages": [', b"not json at all", b"[1, 2, 3]", b""],
                         ids=["truncated", "garbage", "array", "empty"])
def test_malformed_json_is_400(base_url, body):
    resp = http_request(base_url, "POST", CHAT, body, headers={"Content-Type": "application/json"})
    assert_openai_error(resp, 400)


def test_prompt_longer_than_context_is_400(base_url):
    # " hello" is one token: about 9000 prompt tokens against an 8192-token context.
    resp = post_json(base_url, CHAT, chat_request(messages=[{"role": "user", "content": "hello " * 9000}]))
    assert_openai_error(resp, 400)
    completion = post_json(base_url, "/v1/completions",
                           {"model": BASE_MODEL, "prompt": "hello " * 9000, "max_tokens": 2})
    assert_openai_error(completion, 400)


def test_prompt_plus_max_tokens_over_context_is_400(base_url):
    # About 7000 prompt tokens fit alone; with 2000 more to generate they do not.
    long_prompt = "hello " * 7000
    resp = post_json(base_url, "/v1/completions", {"model": BASE_MODEL, "prompt": long_prompt, "max_tokens": 2000})
    assert_openai_error(resp, 400)


def _post_huge_body(base_url: str, size: int) -> Response:
    """POSTs `size` bytes; the server may answer 413 and close before reading it all, so a failed send
    is tolerated as long as the response can be read."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", CHAT)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        prefix = (b'{"model": "' + BASE_MODEL.encode()
                  + b'", "max_tokens": 2, "messages": [{"role": "user", "content": "')
        suffix = b'"}]}'
        filler = b"a" * (size - len(prefix) - len(suffix))
        try:
            conn.send(prefix + filler + suffix)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        headers = [(k.lower(), v) for k, v in resp.getheaders()]
        return Response(resp.status, dict(headers), resp.read(), headers)
    finally:
        conn.close()


def test_body_over_limit_is_413(base_url):
    assert_openai_error(_post_huge_body(base_url, 3 * 1024 * 1024), 413)
    # The server is unaffected.
    assert http_request(base_url, "GET", "/health").status == 200


def test_unknown_route_is_404(base_url):
    resp = http_request(base_url, "GET", "/v1/no-such-route")
    assert_openai_error(resp, 404)
