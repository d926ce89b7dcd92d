"""The OpenAPI document says what the server enforces: schemathesis (pinned in scripts/setup-python.sh) runs
every operation of /openapi.json against a live server with `--checks all` and must report no failure.

The server has no experts (so POST /v1/adaptations answers 409 instead of starting minutes-long CEM jobs)
and no admin key (so POST/DELETE /v1/experts answer 403: uploads are tested in test_experts_runtime.py);
requests default to 4 new tokens and schemathesis_hooks.py caps any max_tokens it generates at 4. The
examples per operation are bounded so that the whole run stays within 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t2_harness import ServerProcess

MAX_EXAMPLES = 8
TIME_LIMIT_S = 180
HERE = Path(__file__).resolve().parent


def schemathesis_cli() -> Path | None:
    path = Path(sys.executable).parent / "schemathesis"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory, log_dir):
    empty = tmp_path_factory.mktemp("no-experts")
    proc = ServerProcess(empty, log_dir, ["--default-max-tokens", "4", "--max-n", "2"],
                         name="schemathesis").start()
    yield proc
    proc.stop()


def test_schemathesis_reports_no_failure(bare_server, tmp_path):
    cli = schemathesis_cli()
    if cli is None:
        pytest.fail("schemathesis is not installed: run `bash scripts/setup-python.sh`")
    har = tmp_path / "requests.har"
    cmd = [str(cli), "--no-color", "run", f"{bare_server.base_url}/openapi.json", "--checks", "all",
           "--max-examples", str(MAX_EXAMPLES), "--seed", "12", "--workers", "1", "--request-timeout", "60",
           "--report", "har", "--report-har-path", str(har), "--generation-database", "none"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIME_LIMIT_S + 60)
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    print(f"schemathesis: {len(entries)} requests in {seconds:.0f} s, exit {proc.returncode}")
    print(output[-3000:])
    assert proc.returncode == 0, output[-12000:]
    assert len(entries) > 0, output[-3000:]
    assert seconds < TIME_LIMIT_S, f"the run took {seconds:.0f} s"
