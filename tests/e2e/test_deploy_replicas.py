"""Several replicas on one machine: two `t2 serve` processes on loopback behind HAProxy (Debian's package) with
the Kubernetes readiness check (`option httpchk GET /ready`), streaming traffic through it, SIGTERM to one
replica mid-load. No request may be lost: the replica's in-flight streams finish, new requests go to the
other replica, and the replica, started again, turns ready and takes traffic."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from deploy_support import free_port, require_binary
from t2_harness import BASE_MODEL, ServerProcess, SseStream

MAX_TOKENS = 24
REQUESTS = 16
CONCURRENCY = 4
# The readiness probe's period in deploy/k8s/deployment.yaml is 2 s; HAProxy checks faster so that the
# test is short, with the same path and the same "one failure takes it out".
CHECK_INTERVAL = "500ms"

HAPROXY_CONFIG = """
global
    stats socket {socket} mode 600 level admin
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A connection refused by a draining replica is tried again on the other one.
    retries 3
    option redispatch 1
frontend t2
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /ready
    http-check expect status 200
    default-server inter {interval} fall 1 rise 1
    http-response set-header X-Served-By %s
{servers}
"""


@dataclass
class Outcome:
    index: int
    started: float
    finished: float = 0.0
    status: int | None = None
    served_by: str | None = None
    tokens: int = 0  # completion_tokens of the usage chunk
    done: bool = False
    error: str | None = None
    # Set on the first token, so the test can wait for streams to be under way on a replica.
    streaming: threading.Event = field(default_factory=threading.Event)

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and self.tokens == MAX_TOKENS and self.error is None


class HAProxy:
    def __init__(self, workdir, backends: dict[str, int]):
        self.port = free_port()
        self.socket_path = workdir / "haproxy.sock"
        servers = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in backends.items())
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(HAPROXY_CONFIG.format(socket=self.socket_path, port=self.port,
                                                     interval=CHECK_INTERVAL, servers=servers))
        self.log = open(workdir / "haproxy.log", "wb")
        binary = require_binary("haproxy")
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Server name → UP / DOWN / ... from `show stat`."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"] != "BACKEND"}

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.states().get(name) == state:
                    return time.monotonic()
            except OSError:
                pass  # the socket appears once haproxy has started
            time.sleep(0.05)
        raise AssertionError(f"haproxy server {name} not {state} within {timeout}s: {self.states()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


def stream_one(base_url: str, index: int, outcomes: list[Outcome]) -> None:
    outcome = Outcome(index, time.monotonic())
    outcomes.append(outcome)
    payload = {"model": f"{BASE_MODEL}:math" if index % 2 else BASE_MODEL, "max_tokens": MAX_TOKENS,
               "messages": [{"role": "user", "content": f"Request {index}: tell me about lighthouses."}],
               "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0}
    try:
        stream = SseStream(base_url, "/v1/chat/completions", payload)
        try:
            outcome.status = stream.status
            outcome.served_by = stream.headers.get("x-served-by")
            for data in stream.events():
                if data == "[DONE]":
                    outcome.done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = str(chunk["error"])
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    outcome.streaming.set()
        finally:
            stream.close()
    except Exception as err:  # noqa: BLE001 - a lost request is what the test counts
        outcome.error = repr(err)
    finally:
        outcome.finished = time.monotonic()
        outcome.streaming.set()


def drive(base_url: str, count: int, first_index: int, outcomes: list[Outcome]) -> list[threading.Thread]:
    """`count` requests, CONCURRENCY at a time, in background threads."""
    indices = iter(range(first_index, first_index + count))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(indices, None)
            if index is None:
                return
            stream_one(base_url, index, outcomes)

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def replicas(experts_dir, log_dir, tmp_path):
    started: list[ServerProcess] = []

    def start(name: str) -> ServerProcess:
        proc = ServerProcess(experts_dir, log_dir, ["--shutdown-timeout-s", "30"], name=name)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def test_sigterm_to_one_replica_mid_load_loses_no_request(replicas, tmp_path):
    r0, r1 = replicas("replica-0"), replicas("replica-1")
    haproxy = HAProxy(tmp_path, {"r0": r0.port, "r1": r1.port})
    try:
        haproxy.wait_state("r0", "UP")
        haproxy.wait_state("r1", "UP")
        outcomes: list[Outcome] = []
        threads = drive(haproxy.base_url, REQUESTS, 0, outcomes)

        # SIGTERM r1 once it is streaming answers.
        deadline = time.monotonic() + 120
        while not [o for o in outcomes if o.served_by == "r1" and o.streaming.is_set() and not o.finished]:
            assert time.monotonic() < deadline, "no stream reached r1"
            time.sleep(0.02)
        sigterm_at = time.monotonic()
        in_flight_on_r1 = [o for o in outcomes if o.served_by == "r1" and not o.finished]
        r1.signal(15)
        down_at = haproxy.wait_state("r1", "DOWN", timeout=30)
        exit_code = r1.wait(timeout=60)
        exited_at = time.monotonic()
        for t in threads:
            t.join(timeout=300)

        # r1 comes back (on a new port, as a new pod would get a new address) and takes traffic again.
        restarted = replicas("replica-1-again")
        restart_ready_at = time.monotonic()
        haproxy.command(f"set server replicas/r1 addr 127.0.0.1 port {restarted.port}")
        up_again_at = haproxy.wait_state("r1", "UP")
        after: list[Outcome] = []
        for t in drive(haproxy.base_url, CONCURRENCY, REQUESTS, after):
            t.join(timeout=300)
    finally:
        haproxy.stop()

    everything = outcomes + after
    lost = [o for o in everything if not o.complete]
    drained = [o for o in in_flight_on_r1 if o.complete and o.finished > sigterm_at]
    started_after_down = [o for o in outcomes if o.started > down_at]
    print(f"\nreplicas: {len(everything)} requests sent, {len(everything) - len(lost)} completed, {len(lost)} lost; "
          f"SIGTERM to r1 with {len(in_flight_on_r1)} streams in flight on it; HAProxy marked it DOWN after "
          f"{down_at - sigterm_at:.2f} s; its in-flight streams finished by "
          f"{max((o.finished for o in in_flight_on_r1), default=sigterm_at) - sigterm_at:.2f} s; it exited "
          f"({exit_code}) after {exited_at - sigterm_at:.2f} s; {len(started_after_down)} requests started after "
          f"DOWN, served by {sorted({o.served_by for o in started_after_down})}; restarted r1 ready and UP "
          f"in HAProxy {up_again_at - restart_ready_at:.2f} s after it turned ready, then served "
          f"{sum(o.served_by == 'r1' for o in after)} of {len(after)} requests")
    assert not lost, [(o.index, o.status, o.served_by, o.tokens, o.done, o.error) for o in lost]
    assert len(everything) == REQUESTS + CONCURRENCY
    assert exit_code == 0
    assert in_flight_on_r1 and len(drained) == len(in_flight_on_r1)
    assert started_after_down and all(o.served_by == "r0" for o in started_after_down)
    assert any(o.served_by == "r1" for o in after)
