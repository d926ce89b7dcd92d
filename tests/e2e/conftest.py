"""Fixtures for the end-to-end tests of `t2 serve`.

One server (session scope) serves most tests; tests that need other flags start their own with
`start_server`, on the same experts folder. Run: `.venv/bin/python -m pytest tests/e2e -x -q`
(after `bash scripts/setup-python.sh` and a build of target/debug/t2, or T2_BIN=path).
"""

from __future__ import annotations

import pytest

from t2_harness import EXPERTS, STORED_MIX, STORED_MIX_NAME, ServerProcess, make_client, run_t2


@pytest.fixture(scope="session")
def experts_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("experts")
    for name, seed in EXPERTS.items():
        run_t2("experts", "synth", "--experts-dir", str(path), "--name", name, "--seed", str(seed),
               "--category", name)
    mix_arg = ",".join(f"{name}={weight}" for name, weight in STORED_MIX.items())
    run_t2("experts", "save-mix", "--experts-dir", str(path), "--name", STORED_MIX_NAME, "--mix", mix_arg)
    return path


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def server(experts_dir, log_dir):
    proc = ServerProcess(experts_dir, log_dir, name="shared").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def client(server):
    sdk_client = make_client(server)
    yield sdk_client
    # Idle keep-alive connections would otherwise be part of what the server has to drain at shutdown.
    sdk_client.close()


@pytest.fixture
def start_server(experts_dir, log_dir):
    """Factory for a server with its own flags; every server it started is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, name: str = "own") -> ServerProcess:
        proc = ServerProcess(experts_dir, log_dir, list(extra_args), env=env, name=name)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the log tail of every running t2 server to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in list(ServerProcess.live):
            report.sections.append((f"t2 server '{proc.name}' log tail ({proc.log_path})", proc.log_tail(60)))
