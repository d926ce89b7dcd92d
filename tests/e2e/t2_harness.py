"""Helpers for the end-to-end tests: running `t2` processes, raw HTTP, SSE and Prometheus text parsing.

Raw HTTP (http.client) is used wherever the test needs to see the exact bytes on the wire or to send
something the OpenAI SDK would refuse to send (malformed JSON, huge bodies, a dropped connection).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = "SmolLM2-135M-Instruct"

# Synthetic experts made for the suite (conftest.experts_dir): each perturbs the model so that its output
# differs from the base's.
EXPERTS = {"math": 1, "code": 2}  # name -> seed of `t2 experts synth`
STORED_MIX_NAME = "blend"
STORED_MIX = {"math": 0.6, "code": 0.4}

# Generous limits: the suite runs on a 2-core machine that may be busy with a cargo build.
LISTEN_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 120.0

LISTENING_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def t2_binary() -> Path:
    """The t2 binary under test: $T2_BIN, else the debug build in target/."""
    path = Path(os.environ.get("T2_BIN", REPO_ROOT / "target" / "debug" / "t2"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


def run_t2(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Runs a short t2 subcommand (experts synth, save-mix, ...) and fails loudly with its stderr."""
    proc = subprocess.run(
        [str(t2_binary()), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`t2 {' '.join(args)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# ---------------------------------------------------------------------------------------------------------
# Server processes


class ServerProcess:
    """One `t2 serve --port 0` process. stderr goes to a file (a pipe nobody reads would fill and block the
    server) that is scanned for the `listening on` line and shown when a test fails."""

    # Every server still running, so that a failing test's report can show their logs.
    live: list["ServerProcess"] = []
    _live_lock = threading.Lock()

    def __init__(self, experts_dir: Path, log_dir: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, name: str = "t2"):
        self.experts_dir = experts_dir
        self.extra_args = list(extra_args or [])
        self.name = name
        self.log_path = log_dir / f"{name}-{os.getpid()}-{id(self):x}.stderr.log"
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    def start(self) -> "ServerProcess":
        binary = t2_binary()
        if not binary.exists():
            raise RuntimeError(f"t2 binary not found at {binary}: build it (cargo build -p t2) or set T2_BIN")
        cmd = [str(binary), "serve", "--port", "0", "--experts-dir", str(self.experts_dir), *self.extra_args]
        # Settings from the caller's environment must not change what the suite tests: a T2_API_KEY there
        # would lock the shared server. T2_MODEL still passes through, to run the suite on another model.
        env = {k: v for k, v in os.environ.items() if k not in ("T2_API_KEY", "T2_ADMIN_KEY", "T2_HOST", "T2_PORT", "T2_EXPERTS")}
        if self.env:
            env.update(self.env)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        with ServerProcess._live_lock:
            ServerProcess.live.append(self)
        try:
            self.port = self._wait_listening()
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_listening(self) -> int:
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING_RE.search(self.log_text())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before listening\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} printed no `listening on` line within {LISTEN_TIMEOUT_S}s\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while loading\n{self.log_tail()}")
            try:
                last = http_request(self.base_url, "GET", "/ready", timeout=5)
                if last.status == 200:
                    return
            except OSError as err:
                last = err
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT_S}s (last /ready: {last})\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._forget()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        with ServerProcess._live_lock:
            if self in ServerProcess.live:
                ServerProcess.live.remove(self)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
            self._log_file = None


# ---------------------------------------------------------------------------------------------------------
# Raw HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers!r}, {self.body[:500]!r})"


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def http_request(base_url: str, method: str, path: str, body: bytes | str | dict | list | None = None,
                 headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT_S) -> Response:
    """One request on a fresh connection. A dict/list body is sent as JSON; bytes/str are sent verbatim."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    conn = _connection(base_url, timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        header_list = [(k.lower(), v) for k, v in resp.getheaders()]
        return Response(resp.status, dict(header_list), data, header_list)
    finally:
        conn.close()


def post_json(base_url: str, path: str, payload, headers: dict[str, str] | None = None,
              timeout: float = HTTP_TIMEOUT_S) -> Response:
    return http_request(base_url, "POST", path, payload, headers=headers, timeout=timeout)


class SseStream:
    """A streaming POST read event by event. `events()` yields the `data:` payload of each SSE event
    (one event may span several `data:` lines, joined with newlines as the SSE spec says)."""

    def __init__(self, base_url: str, path: str, payload: dict, headers: dict[str, str] | None = None,
                 timeout: float = HTTP_TIMEOUT_S):
        self.conn = _connection(base_url, timeout)
        hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
        self.conn.request("POST", path, body=json.dumps(payload).encode(), headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def events(self):
        data_lines: list[str] = []
        while True:
            raw = self.resp.readline()
            if not raw:  # end of body
                if data_lines:
                    yield "\n".join(data_lines)
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if line == "":
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            if line.startswith(":"):  # SSE comment (keep-alive)
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data_lines.append(value)

    def read_body(self) -> bytes:
        return self.resp.read()

    def abort(self) -> None:
        """Drops the connection abruptly, as a client that goes away mid-stream would."""
        import socket

        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        try:
            self.resp.close()
        finally:
            self.conn.close()


def collect_sse(base_url: str, path: str, payload: dict, headers: dict[str, str] | None = None):
    """Runs a whole streaming request: returns (stream, list of raw data payloads including '[DONE]')."""
    stream = SseStream(base_url, path, payload, headers=headers)
    try:
        if stream.status != 200:
            body = stream.read_body()
            raise AssertionError(f"streaming request got {stream.status}: {body[:500]!r}")
        return stream, list(stream.events())
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------------------
# Prometheus text exposition format (version 0.0.4)

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>\S+)"
    r"(?:\s+(?P<ts>-?\d+))?\s*$"
)
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "untyped": ("",),
}


@dataclass
class MetricFamily:
    name: str
    type: str
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


class PrometheusParseError(AssertionError):
    pass


def _unescape_label(value: str) -> str:
    # The format escapes only backslash, double quote and newline inside label values.
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse_labels(text: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if not match:
            raise PrometheusParseError(f"bad label set in line {line!r}")
        key = match.group(1)
        if key in labels:
            raise PrometheusParseError(f"duplicate label {key!r} in line {line!r}")
        labels[key] = _unescape_label(match.group(2))
        pos = match.end()
    return labels


def _parse_value(text: str, line: str) -> float:
    specials = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in specials:
        return specials[text]
    try:
        return float(text)
    except ValueError:
        raise PrometheusParseError(f"bad sample value {text!r} in line {line!r}") from None


def parse_prometheus(text: str) -> dict[str, MetricFamily]:
    """Parses the text format strictly: every sample must belong to a family declared by a preceding
    `# TYPE` line (with the suffixes its type allows), values must be numbers, histogram buckets must be
    cumulative and end with le="+Inf" equal to _count."""
    families: dict[str, MetricFamily] = {}
    current: MetricFamily | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                name, mtype = parts[2], (parts[3].strip() if len(parts) > 3 else "")
                if mtype not in _SUFFIXES:
                    raise PrometheusParseError(f"unknown metric type in {line!r}")
                if name in families and families[name].samples:
                    raise PrometheusParseError(f"# TYPE for {name} after its samples")
                families.setdefault(name, MetricFamily(name, mtype)).type = mtype
                current = families[name]
            elif len(parts) >= 3 and parts[1] == "HELP":
                families.setdefault(parts[2], MetricFamily(parts[2], "untyped")).help = (
                    parts[3] if len(parts) > 3 else "")
            continue  # other comments are allowed
        match = _SAMPLE_RE.match(line)
        if not match:
            raise PrometheusParseError(f"unparseable sample line {line!r}")
        name = match.group("name")
        family = _family_of(name, current, families)
        if family is None:
            raise PrometheusParseError(f"sample {name!r} has no preceding # TYPE line")
        labels = _parse_labels(match.group("labels") or "", line)
        family.samples.append((name, labels, _parse_value(match.group("value"), line)))
    for family in families.values():
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _family_of(sample_name: str, current: MetricFamily | None, families: dict[str, MetricFamily]):
    candidates = [current] if current is not None else []
    candidates += list(families.values())
    for family in candidates:
        for suffix in _SUFFIXES[family.type]:
            if sample_name == family.name + suffix:
                return family
    return None


def _check_histogram(family: MetricFamily) -> None:
    def series_key(labels: dict[str, str]):
        return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))

    buckets: dict[tuple, list[tuple[float, float]]] = {}
    counts: dict[tuple, float] = {}
    for name, labels, value in family.samples:
        if name.endswith("_bucket"):
            if "le" not in labels:
                raise PrometheusParseError(f"{name} bucket without le label")
            buckets.setdefault(series_key(labels), []).append((_parse_value(labels["le"], name), value))
        elif name.endswith("_count"):
            counts[series_key(labels)] = value
    for key, series in buckets.items():
        bounds = [b for b, _ in series]
        values = [v for _, v in series]
        if bounds != sorted(bounds) or bounds[-1] != math.inf:
            raise PrometheusParseError(f"{family.name}{dict(key)}: buckets not ascending or no +Inf bucket")
        if any(b > a for a, b in zip(values[1:], values[:-1])):
            raise PrometheusParseError(f"{family.name}{dict(key)}: bucket counts not cumulative: {values}")
        if key not in counts or counts[key] != values[-1]:
            raise PrometheusParseError(
                f"{family.name}{dict(key)}: +Inf bucket {values[-1]} != _count {counts.get(key)}")


def metric_value(families: dict[str, MetricFamily], sample_name: str, **label_filter: str) -> float:
    """Sum of the samples called `sample_name` whose labels include `label_filter` (0 if none)."""
    total = 0.0
    for family in families.values():
        for name, labels, value in family.samples:
            if name == sample_name and all(labels.get(k) == v for k, v in label_filter.items()):
                total += value
    return total


def fetch_metrics(base_url: str) -> dict[str, MetricFamily]:
    resp = http_request(base_url, "GET", "/metrics")
    assert resp.status == 200, resp
    return parse_prometheus(resp.text)


# ---------------------------------------------------------------------------------------------------------
# Assertions shared by several test files


def assert_openai_error(resp: Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The response has `status` and the OpenAI error body {"error": {message, type, param, code}}."""
    assert resp.status == status, f"expected HTTP {status}, got {resp!r}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def parse_mix_header(value: str) -> tuple[str, dict[str, float]]:
    """`x-t2-mix` header → (kind, weights): "base" → ("base", {}), "expert:math" → ("expert", {"math": 1}),
    "mix:code=0.3,math=0.7" → ("mix", {...})."""
    kind, _, rest = value.partition(":")
    if kind == "base":
        assert rest == "", value
        return kind, {}
    if kind == "expert":
        assert rest and "=" not in rest, value
        return kind, {rest: 1.0}
    weights = {}
    for part in rest.split(","):
        name, eq, weight = part.partition("=")
        assert eq, f"malformed x-t2-mix {value!r}"
        weights[name] = float(weight)
    return kind, weights


# ---------------------------------------------------------------------------------------------------------
# OpenAI SDK shortcuts


def make_client(server: ServerProcess, api_key: str = "unused", **kwargs):
    """An OpenAI SDK client for `server`. No retries: a 429 or 5xx must reach the test, not be hidden by the
    SDK's back-off."""
    import openai

    return openai.OpenAI(base_url=server.api_base, api_key=api_key, max_retries=0, timeout=HTTP_TIMEOUT_S,
                         **kwargs)


def chat(client, prompt: str, *, model: str = BASE_MODEL, max_tokens: int = 16, temperature: float = 0.0,
         **kwargs):
    """One non-streaming chat completion of a single user message (greedy unless told otherwise)."""
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, **kwargs)


def extra_field(obj, name: str):
    """A field the OpenAI types do not declare (t2's `adaptation`): the SDK keeps such fields as extras."""
    extras = getattr(obj, "model_extra", None) or {}
    if name in extras:
        return extras[name]
    return getattr(obj, name)
