"""Experts at run time: POST /v1/experts uploads an expert file, DELETE /v1/experts/{name} removes one,
GET /v1/experts shows what uses each; all without a restart.

The server here has its own copy of the suite's experts folder (these tests change it), an admin key and a
plain API key. Expert files are made with `t2 experts synth` in a scratch store and posted as raw bytes;
the bad uploads are those files edited at the byte level (safetensors: an 8-byte little-endian header
length, a JSON header with `__metadata__`, then the tensor data).
"""

from __future__ import annotations

import http.client
import json
import shutil
import struct
import time

import pytest

from t2_harness import (BASE_MODEL, Response, ServerProcess, SseStream, assert_openai_error, http_request,
                        make_client, run_t2)

ADMIN = "admin-secret"
USER = "user-secret"
MAX_EXPERT_BYTES = 2_000_000  # a synthetic expert of the default model is about 0.4 MB
PROMPT = "Name three prime numbers."

# name -> seed of the expert files made for these tests; swap-v2 and twin share a seed, so their vectors
# are equal.
SYNTH = {"physics": 11, "swap": 21, "swap-v2": 22, "twin": 22, "streamer": 31}


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory) -> dict[str, bytes]:
    scratch = tmp_path_factory.mktemp("synth")
    for name, seed in SYNTH.items():
        run_t2("experts", "synth", "--experts-dir", str(scratch), "--name", name, "--seed", str(seed),
               "--category", "reasoning")
    folder = scratch / BASE_MODEL
    return {name: (folder / f"{name}.safetensors").read_bytes() for name in SYNTH}


@pytest.fixture(scope="module")
def store_root(experts_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-experts") / "experts"
    shutil.copytree(experts_dir, root)
    return root


@pytest.fixture(scope="module")
def admin_server(store_root, log_dir):
    # Merging after 2 steps, so that a test can see merged weights built from an expert being dropped.
    proc = ServerProcess(store_root, log_dir, ["--admin-key", ADMIN, "--api-key", USER, "--max-expert-bytes",
                                               str(MAX_EXPERT_BYTES), "--merge-after-steps", "2"],
                         env={"T2_LOG": "info", "T2_LOG_FORMAT": "json"}, name="experts-admin").start()
    yield proc
    proc.stop()


def logged_changes(server) -> list[dict]:
    """The expert changes the server logged (JSON log lines), as their fields."""
    out = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            fields = json.loads(line).get("fields", {})
            if fields.get("message", "").startswith("expert "):
                out.append(fields)
    return out


def manifest_path(store_root):
    return store_root / BASE_MODEL / "manifest.json"


def store_state(store_root) -> dict[str, bytes]:
    """Every file of the store's folder with its bytes (but the writers' lock file, which holds nothing)."""
    folder = store_root / BASE_MODEL
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".manifest.lock"}


def upload(server, data: bytes, key: str | None = ADMIN) -> Response:
    """POSTs an expert file. The server may answer (401, 403, 413) and close before reading it all, so a
    failed send is tolerated as long as the response can be read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.putrequest("POST", "/v1/experts")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(len(data)))
        if key is not None:
            conn.putheader("Authorization", f"Bearer {key}")
        conn.endheaders()
        try:
            conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        headers = [(k.lower(), v) for k, v in resp.getheaders()]
        return Response(resp.status, dict(headers), resp.read(), headers)
    finally:
        conn.close()


def delete(server, name: str, key: str | None = ADMIN):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return http_request(server.base_url, "DELETE", f"/v1/experts/{name}", headers=headers)


def experts_listing(server) -> dict[str, dict]:
    resp = http_request(server.base_url, "GET", "/v1/experts", headers={"Authorization": f"Bearer {USER}"})
    assert resp.status == 200, resp
    return {e["name"]: e for e in resp.json()["data"]}


def greedy_text(server, model: str, max_tokens: int = 12) -> str:
    client = make_client(server, api_key=USER)
    try:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content
    finally:
        client.close()


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def with_metadata(data: bytes, **changes: str) -> bytes:
    header, payload = split_safetensors(data)
    header["__metadata__"].update(changes)
    return join_safetensors(header, payload)


def with_nan(data: bytes) -> bytes:
    header, payload = split_safetensors(data)
    name = next(k for k in header if k != "__metadata__")
    start = header[name]["data_offsets"][0]
    payload = payload[:start] + struct.pack("<f", float("nan")) + payload[start + 4:]
    return join_safetensors(header, payload)


def test_upload_is_served_without_restart_then_delete(admin_server, expert_files, store_root):
    model = f"{BASE_MODEL}:physics"
    base_text = greedy_text(admin_server, BASE_MODEL)
    resp = upload(admin_server, expert_files["physics"])
    assert resp.status == 201, resp
    card = resp.json()
    assert card["name"] == "physics" and card["model"] == model, card
    assert len(card["digest"]) == 64 and card["state"] == "loaded", card
    assert card["sequences"] == 0 and card["requests"] == 0 and card["merged"] is False, card
    manifest = json.loads(manifest_path(store_root).read_text())
    entry = next(e for e in manifest["experts"] if e["name"] == "physics")
    assert (store_root / BASE_MODEL / entry["file"]).is_file()

    models = http_request(admin_server.base_url, "GET", "/v1/models", headers={"Authorization": f"Bearer {USER}"})
    assert model in [m["id"] for m in models.json()["data"]]
    client = make_client(admin_server, api_key=USER)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0,
            extra_body={"ignore_eos": True})
        assert raw.headers["x-t2-mix"] == "expert:physics"
        assert raw.parse().choices[0].message.content != base_text  # the expert changes the output
    finally:
        client.close()

    resp = delete(admin_server, "physics")
    assert resp.status == 200, resp
    assert resp.json() == {"id": "physics", "object": "expert", "deleted": True}
    assert "physics" not in experts_listing(admin_server)
    chat = http_request(admin_server.base_url, "POST", "/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                        headers={"Authorization": f"Bearer {USER}"})
    assert_openai_error(chat, 404, code="model_not_found")
    assert_openai_error(delete(admin_server, "physics"), 404)
    manifest = json.loads(manifest_path(store_root).read_text())
    assert "physics" not in [e["name"] for e in manifest["experts"]]
    assert not (store_root / BASE_MODEL / entry["file"]).exists()
    changes = [(c["message"], c["expert"], c["by"]) for c in logged_changes(admin_server)]
    assert ("expert uploaded", "physics", "admin key") in changes, changes
    assert ("expert removed", "physics", "admin key") in changes, changes
    assert all(len(c["digest"]) == 64 for c in logged_changes(admin_server))


def test_only_admin_keys_change_experts(admin_server, server, expert_files, store_root):
    before = store_state(store_root)
    assert_openai_error(upload(admin_server, expert_files["physics"], key=None), 401)
    assert_openai_error(upload(admin_server, expert_files["physics"], key="wrong"), 401)
    assert_openai_error(upload(admin_server, expert_files["physics"], key=USER), 403,
                        code="insufficient_permissions")
    assert_openai_error(delete(admin_server, "math", key=USER), 403)
    # The suite's shared server has no --admin-key: nobody may change its experts.
    assert_openai_error(upload(server, expert_files["physics"], key=ADMIN), 403)
    assert_openai_error(http_request(server.base_url, "DELETE", "/v1/experts/math"), 403)
    assert store_state(store_root) == before


BAD_UPLOADS = {
    "other-model": lambda files: with_metadata(files["physics"], model_id="Some-Other-Model"),
    "truncated": lambda files: files["physics"][: len(files["physics"]) // 2],
    "nan-vector": lambda files: with_nan(files["physics"]),
    "oversized": lambda files: files["physics"] + b"\0" * MAX_EXPERT_BYTES,
    "path-like-name": lambda files: with_metadata(files["physics"], name="../../escaped"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_4xx_and_change_nothing(admin_server, expert_files, store_root, case):
    before = store_state(store_root)
    listed = experts_listing(admin_server)
    resp = upload(admin_server, BAD_UPLOADS[case](expert_files))
    status = 413 if case == "oversized" else 400
    error = assert_openai_error(resp, status)
    needle = {"other-model": "Some-Other-Model", "truncated": "unreadable", "nan-vector": "non-finite",
              "oversized": str(MAX_EXPERT_BYTES), "path-like-name": "not a valid expert name"}[case]
    assert needle in error["message"], error
    assert store_state(store_root) == before
    assert experts_listing(admin_server).keys() == listed.keys()
    assert not list(store_root.glob("**/escaped*"))
    assert_openai_error(delete(admin_server, "..."), 400)  # a path-like name to delete is refused too


def test_reupload_reuses_nothing_of_the_old_version(admin_server, expert_files):
    model = f"{BASE_MODEL}:swap"
    assert upload(admin_server, expert_files["swap"]).status == 201
    # 24 tokens alone in the batch: past --merge-after-steps, so merged weights get built from version 1.
    old_text = greedy_text(admin_server, model, max_tokens=24)
    deadline = time.monotonic() + 90
    while not experts_listing(admin_server)["swap"]["merged"]:
        assert time.monotonic() < deadline, "version 1 was never merged"
        time.sleep(0.5)
    old_digest = experts_listing(admin_server)["swap"]["digest"]

    # Version 2 under the same name: the file's metadata says "swap-v2"; rename it.
    resp = upload(admin_server, with_metadata(expert_files["swap-v2"], name="swap"))
    assert resp.status == 200, resp  # replaced
    card = resp.json()
    assert card["digest"] != old_digest and card["merged"] is False and card["sequences"] == 0, card
    new_text = greedy_text(admin_server, model, max_tokens=24)
    assert new_text != old_text
    # The same vectors under a fresh name give the same tokens: version 2 ran with nothing of version 1.
    assert upload(admin_server, expert_files["twin"]).status == 201
    assert greedy_text(admin_server, f"{BASE_MODEL}:twin", max_tokens=24) == new_text
    replaced = [c for c in logged_changes(admin_server) if c["message"] == "expert replaced"]
    assert replaced and replaced[-1]["replaced"] == old_digest, replaced
    for name in ("swap", "twin"):
        assert delete(admin_server, name).status == 200


def test_delete_while_streaming_is_refused_and_the_stream_finishes(admin_server, expert_files):
    assert upload(admin_server, expert_files["streamer"]).status == 201
    payload = {"model": f"{BASE_MODEL}:streamer", "messages": [{"role": "user", "content": PROMPT}],
               "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    stream = SseStream(admin_server.base_url, "/v1/chat/completions", payload,
                       headers={"Authorization": f"Bearer {USER}"})
    try:
        assert stream.status == 200
        events = stream.events()
        first = json.loads(next(events))
        assert first["object"] == "chat.completion.chunk"
        resp = delete(admin_server, "streamer")
        error = assert_openai_error(resp, 409, code="expert_in_use")
        assert "in use" in error["message"], error
        card = experts_listing(admin_server)["streamer"]
        assert card["state"] == "in_use" and card["requests"] >= 1, card
        rest = list(events)
    finally:
        stream.close()
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(e) for e in rest[:-1]]
    assert not any("error" in c for c in chunks), chunks
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert "length" in finishes, chunks
    # Once the stream is over, nothing holds the expert.
    deadline = time.monotonic() + 30
    while (resp := delete(admin_server, "streamer")).status == 409:
        assert time.monotonic() < deadline, resp
        time.sleep(0.2)
    assert resp.status == 200, resp
