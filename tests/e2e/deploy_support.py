"""Helpers for the deployment tests (test_deploy_*.py): a real Prometheus from Debian's `prometheus` package,
the PromQL written in deploy/ (dashboard, README, alert rules, autoscaler), and the Kubernetes manifests.

Prometheus runs as a subprocess on a free loopback port with its own temporary TSDB, scraping every second,
and is killed when the test module ends.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from t2_harness import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "t2.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DEPLOY_README = DEPLOY / "README.md"
# Series Prometheus makes itself for every target, not t2's.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"`{name}` is not installed: run `bash scripts/setup-deploy-tests.sh`")
    return path


class PrometheusServer:
    """`prometheus` scraping `targets` (host:port) as job "t2" every second."""

    def __init__(self, targets: list[str], workdir: Path):
        self.targets = targets
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusServer":
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "t2", "metrics_path": "/metrics",
                                "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [require_binary("prometheus"), f"--config.file={config_path}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within 60 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:  # 400/422 carry Prometheus's own error body
            return json.load(err)

    def query(self, expr: str, at: float | None = None) -> dict:
        """An instant query; returns Prometheus's whole answer (status, data or errorType/error)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)

    def value(self, expr: str, at: float | None = None) -> float:
        """The value of a query that must return exactly one series."""
        answer = self.query(expr, at)
        assert answer["status"] == "success", (expr, answer)
        result = answer["data"]["result"]
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_for_scrape(self, after: float, timeout: float = 30.0) -> None:
        """Waits until every target has been scraped at a time later than `after` (unix seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.api("targets")["data"]["activeTargets"]
            if targets and all(t["health"] == "up" and _rfc3339(t["lastScrape"]) > after for t in targets):
                return
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not scrape every target after {after}: {self.api('targets')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def _rfc3339(stamp: str) -> float:
    # Prometheus writes nanoseconds and a zone; Python's parser takes microseconds.
    from datetime import datetime

    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    assert match, stamp
    base, frac, zone = match.groups()
    seconds = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return seconds + (float(frac) if frac else 0.0)


# ---------------------------------------------------------------------------------------------------------
# The PromQL written in deploy/


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def readme_queries() -> list[str]:
    """Every line of every ```promql block of deploy/README.md (blank lines and # comments aside)."""
    blocks = re.findall(r"```promql\n(.*?)```", DEPLOY_README.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def with_grafana_variables(expr: str, rate_interval: str) -> str:
    """Grafana replaces $__rate_interval before sending a panel's query; so does this, for Prometheus's API."""
    return expr.replace("$__rate_interval", rate_interval)


_PROMQL_WORDS = {
    # aggregations, functions without a following "(" in our style never occur, but keywords do
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are neither functions (followed by "("),
    keywords, label names inside {...} or by/without/on/ignoring (...) lists, nor in strings or ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+(\.\d+)?(e[+-]?\d+)?", word):
            continue
        names.add(word)
    return names


# ---------------------------------------------------------------------------------------------------------
# Kubernetes manifests


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if "schemas" not in p.parts)


def manifests() -> list[tuple[Path, dict]]:
    """Every resource of every manifest (documents that hold only comments are skipped)."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def find(kind: str, path: Path | None = None) -> list[dict]:
    return [doc for p, doc in manifests() if doc["kind"] == kind and (path is None or p == path)]


def main_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, (flag, args)
    return args[args.index(flag) + 1]
