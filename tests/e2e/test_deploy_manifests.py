"""deploy/k8s, the compose file and the Grafana provisioning, checked offline (Kubernetes schemas, the CRDs'
schemas in deploy/k8s/schemas, checkov) and against the real binary: the Deployment's arguments start
`t2 serve`, its probes answer on that live server, the metrics named by the autoscaler, the alerts and the
endpoint picker exist in its /metrics, and its /v1/models serves every InferenceModel. Also the
vLLM-compatible metrics against a recorded vLLM 0.10.1.1 fixture, and how replicas converge on experts added
to the shared store: a restarted replica serves them."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_support import (ALERTS, DASHBOARD, DEPLOY, K8S, PROMETHEUS_SYNTHETIC, alert_rules, dashboard, find,
                            flag_value, main_container, manifest_files, manifests, metric_names)
from t2_harness import (BASE_MODEL, REPO_ROOT, ServerProcess, SseStream, fetch_metrics, http_request,
                        parse_prometheus, post_json, run_t2, t2_binary)

KUBERNETES_VERSION = "1.37.0"
SCHEMAS = K8S / "schemas"
VLLM_FIXTURE = Path(__file__).parent / "fixtures" / "vllm-0.10.1.1-metrics.txt"
DEPLOYMENTS = [K8S / "deployment.yaml", K8S / "gpu" / "deployment.yaml"]
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"


def crd_schema(doc: dict) -> dict | None:
    group_version = doc["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{doc['kind']}.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate(doc: dict) -> str:
    """Validates one resource: built-in kinds against Kubernetes's schemas (strict), custom resources against
    deploy/k8s/schemas. Returns which one; raises on an invalid resource or a kind neither knows."""
    schema = crd_schema(doc)
    if schema is not None:
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
        return "crd-schema"
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    return "kubernetes"


# ---------------------------------------------------------------------------------------------------------
# Offline


def test_every_manifest_validates():
    docs = manifests()
    assert len(manifest_files()) >= 15 and len(docs) >= 30, [str(p) for p in manifest_files()]
    how = {}
    for path, doc in docs:
        try:
            how[validate(doc)] = how.get(validate(doc), 0) + 1
        except Exception as err:  # noqa: BLE001 - the report names the file and resource
            pytest.fail(f"{path.relative_to(REPO_ROOT)}: {doc['kind']}/{doc['metadata']['name']}: {err}")
    print(f"\nmanifests: {len(manifest_files())} files, {len(docs)} resources, 0 errors "
          f"({how.get('kubernetes', 0)} by kubernetes-validate {KUBERNETES_VERSION} strict, "
          f"{how.get('crd-schema', 0)} by the CRD schemas)")
    kinds = {doc["kind"] for _, doc in docs}
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "PodMonitor", "InferencePool",
                 "InferenceModel", "PersistentVolumeClaim"]:
        assert kind in kinds, kind


@pytest.mark.parametrize("path, mutate, message", [
    ("deployment.yaml", lambda d: main_container(d).__setitem__("readinesProbe", {}), "readinesProbe"),
    ("deployment.yaml", lambda d: d["spec"].__setitem__("replicas", "two"), "two"),
    ("scaledobject.yaml", lambda d: d["spec"].pop("triggers"), "triggers"),
    ("inference/inferencepool.yaml", lambda d: d["spec"].__setitem__("targetPort", 8080), "targetPort"),
    ("inference/inferencemodels.yaml", lambda d: d["spec"].__setitem__("criticality", "Urgent"), "Urgent"),
    ("podmonitor.yaml", lambda d: d["spec"]["podMetricsEndpoints"][0].__setitem__("interval", "5 seconds"),
     "5 seconds"),
])
def test_validation_catches_broken_manifests(path, mutate, message):
    # The validation above means something only if it rejects what the API server would.
    doc = copy.deepcopy(next(d for p, d in manifests() if p == K8S / path))
    mutate(doc)
    with pytest.raises(Exception, match=re.escape(message)):
        validate(doc)


def test_security_lint_has_no_failures(tmp_path):
    report = subprocess.run(
        [str(CHECKOV), "--directory", str(K8S), "--framework", "kubernetes", "--skip-download", "--output", "json"], capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert report.stdout.strip(), report.stderr[-2000:]
    results = json.loads(report.stdout)
    summary = results["summary"]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results["results"]["failed_checks"]]
    passed = {c["check_id"] for c in results["results"]["passed_checks"]}
    print(f"\ncheckov: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped")
    assert summary["failed"] == 0, failed
    # The checks the issue names: non-root, read-only root filesystem, no privilege escalation, limits.
    for check in ["CKV_K8S_23", "CKV_K8S_22", "CKV_K8S_20", "CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_8", "CKV_K8S_9"]:
        assert check in passed, (check, sorted(passed))
    skipped = {c["check_id"] for c in results["results"]["skipped_checks"]}
    assert skipped <= {"CKV_K8S_43", "CKV_K8S_38"}, skipped


def test_prometheusrule_holds_the_alert_rules():
    rule = find("PrometheusRule")[0]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_termination_grace_covers_prestop_and_shutdown_timeout():
    for path in DEPLOYMENTS:
        deployment = find("Deployment", path)[0]
        pod = deployment["spec"]["template"]["spec"]
        container = main_container(deployment)
        shutdown = int(flag_value(container["args"], "--shutdown-timeout-s"))
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep", sleep
        assert pod["terminationGracePeriodSeconds"] > shutdown + int(sleep[1]), (path, pod, shutdown, sleep)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["t2"]
    grace = int(compose["stop_grace_period"].removesuffix("s"))
    args = compose["command"]
    shutdown = int(flag_value(args, "--shutdown-timeout-s")) if "--shutdown-timeout-s" in args else 30
    assert grace > shutdown, (grace, shutdown)


def test_compose_and_grafana_provisioning_fit_together():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert {"t2", "prometheus", "grafana"} <= set(compose)
    for service in compose.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert (DEPLOY / host).exists(), volume
    assert (DEPLOY / "prometheus.yml").exists()
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus_config["scrape_configs"][0]["job_name"] == "t2"
    mounted_alerts = [v for v in compose["prometheus"]["volumes"] if v.startswith("./prometheus/alerts.yml:")]
    assert mounted_alerts and mounted_alerts[0].split(":")[1] in prometheus_config["rule_files"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus"}
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/t2.yml").read_text())["providers"]
    dashboards_mount = [v for v in compose["grafana"]["volumes"] if v.startswith("./grafana/dashboards:")][0]
    assert providers[0]["options"]["path"] == dashboards_mount.split(":")[1]
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36 and board["uid"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 14
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] in uids for t in panel["targets"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    assert DASHBOARD.name == "t2.json"


# ---------------------------------------------------------------------------------------------------------
# Against the binary


def deployment_args(path: Path) -> list[str]:
    args = main_container(find("Deployment", path)[0])["args"]
    assert args[0] == "serve", args
    return args[1:]


@pytest.fixture(scope="module")
def image_experts(tmp_path_factory):
    """What the init container puts on an empty volume: the experts baked into the image (the repo's)."""
    path = tmp_path_factory.mktemp("experts-volume")
    shutil.copytree(REPO_ROOT / "experts", path, dirs_exist_ok=True)
    return path


@pytest.fixture(scope="module")
def manifest_server(image_experts, log_dir):
    """t2 serve with exactly the Deployment's arguments (the harness adds --port 0 and the experts volume,
    which the manifest sets through T2_PORT / T2_EXPERTS)."""
    proc = ServerProcess(image_experts, log_dir, deployment_args(K8S / "deployment.yaml"), name="manifest").start()
    yield proc
    proc.stop()


def test_container_arguments_are_accepted_by_t2_serve(manifest_server):
    help_text = subprocess.run([str(t2_binary()), "serve", "--help"], capture_output=True, text=True).stdout
    for path in DEPLOYMENTS:
        container = main_container(find("Deployment", path)[0])
        args = deployment_args(path)
        for flag in [a for a in args if a.startswith("--")]:
            assert re.search(rf"\s{re.escape(flag)}\b", help_text), (path, flag)
        # clap parses (and refuses) every argument before it acts on --help.
        parsed = subprocess.run([str(t2_binary()), "serve", *args, "--help"], capture_output=True, text=True)
        assert parsed.returncode == 0, (path, parsed.stderr)
        for env in container["env"]:
            if env["name"] != "T2_LOG":
                assert f"env: {env['name']}=" in help_text, env
    bad = subprocess.run([str(t2_binary()), "serve", "--max-batchez", "3", "--help"], capture_output=True, text=True)
    assert bad.returncode != 0
    # The CPU variant's arguments actually serve (the fixture started it).
    assert http_request(manifest_server.base_url, "GET", "/ready").status == 200


def test_probes_answer_on_the_named_port(manifest_server):
    for path in DEPLOYMENTS:
        container = main_container(find("Deployment", path)[0])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert ports[get["port"]] == int(env["T2_PORT"]), (path, probe, ports, env)
            assert http_request(manifest_server.base_url, "GET", get["path"]).status == 200, (path, probe)
        assert {"/health", "/ready"} == {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    service = find("Service", K8S / "service.yaml")[0]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    monitor = find("PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]
    assert monitor["port"] in ports
    assert http_request(manifest_server.base_url, "GET", monitor["path"]).status == 200


def _named_metrics() -> dict[str, set[str]]:
    """Metric names per place in the deployment that names them. (The dashboard's and the README's are
    checked by test_deploy_prometheus.py, which needs each of their queries to return data.)"""
    scaler = find("ScaledObject")[0]["spec"]["triggers"]
    named = {"ScaledObject": set().union(*(metric_names(t["metadata"]["query"]) for t in scaler))}
    named["alerts.yml"] = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    named["PrometheusRule"] = set().union(*(metric_names(r["expr"]) for g in find("PrometheusRule")[0]["spec"]["groups"]
                                            for r in g["rules"]))
    epp_args = main_container(find("Deployment", K8S / "inference" / "epp.yaml")[0])["args"]
    named["endpoint picker"] = {flag_value(epp_args, f) for f in
                                ("-totalQueuedRequestsMetric", "-kvCacheUsagePercentageMetric", "-loraInfoMetric")}
    return named


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le, job) (rate(t2_x_bucket{job="a", le=~"1"}[5m]))) > 5') \
        == {"t2_x_bucket"}
    assert metric_names("a_b / c:d or up{x=\"y\"} == 0") == {"a_b", "c:d", "up"}


def test_every_metric_the_deployment_names_exists(manifest_server):
    families = fetch_metrics(manifest_server.base_url)
    samples = {name for family in families.values() for name, _, _ in family.samples} | set(families)
    samples |= PROMETHEUS_SYNTHETIC
    named = _named_metrics()
    assert len(named["ScaledObject"]) >= 1 and len(named["alerts.yml"]) >= 5 and len(named["endpoint picker"]) == 3
    for where, names in named.items():
        missing = sorted(names - samples)
        assert not missing, (where, missing)


def test_every_inference_model_is_served(manifest_server):
    served = {m["id"] for m in http_request(manifest_server.base_url, "GET", "/v1/models").json()["data"]}
    models = {m["spec"]["modelName"] for m in find("InferenceModel")}
    assert models == served, (sorted(models - served), sorted(served - models))
    pool = find("InferencePool")[0]["spec"]
    deployment = find("Deployment", K8S / "deployment.yaml")[0]
    assert pool["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pool["targetPortNumber"] == main_container(deployment)["ports"][0]["containerPort"]


# ---------------------------------------------------------------------------------------------------------
# vLLM-compatible metrics against vLLM 0.10.1.1's


def _into_decoding(events, tokens: int = 3) -> None:
    """Reads a stream until a few tokens have come: the request is then decoding in the batch (the opening
    chunk, which only names the role, comes before admission, and the scheduler's gauges are updated
    between steps)."""
    seen = 0
    for data in events:
        choices = json.loads(data).get("choices") or [{}]
        seen += bool(choices[0].get("delta", {}).get("content"))
        if seen == tokens:
            return
    raise AssertionError(f"the stream ended after {seen} tokens")


def _vllm_families(families) -> dict:
    return {name: family for name, family in families.items() if name.startswith("vllm:")}


def test_vllm_aliases_have_vllm_0_10_1_1_names_types_and_labels(manifest_server):
    reference = _vllm_families(parse_prometheus(VLLM_FIXTURE.read_text()))
    assert len(reference) == 4, reference
    # A request on an expert, in flight while /metrics is read: it must show as that adapter.
    payload = {"model": f"{BASE_MODEL}:math", "messages": [{"role": "user", "content": "Count to fifty."}],
               "max_tokens": 48, "stream": True, "ignore_eos": True}
    stream = SseStream(manifest_server.base_url, "/v1/chat/completions", payload)
    try:
        assert stream.status == 200
        events = stream.events()
        _into_decoding(events)
        during = fetch_metrics(manifest_server.base_url)
        for _ in events:
            pass
    finally:
        stream.close()
    after = fetch_metrics(manifest_server.base_url)
    ours = _vllm_families(during)
    assert set(ours) == set(reference), (sorted(ours), sorted(reference))
    for name, family in reference.items():
        mine = ours[name]
        assert mine.type == family.type, name
        assert [sorted(labels) for _, labels, _ in mine.samples] == [sorted(labels) for _, labels, _ in family.samples], (
            name, mine.samples, family.samples)
    engine = {"model_name": BASE_MODEL, "engine": "0"}

    def value(families, name):
        (sample,) = [v for _, labels, v in families[name].samples if labels == engine]
        return sample

    assert value(during, "vllm:num_requests_running") >= 1
    assert 0 < value(during, "vllm:kv_cache_usage_perc") <= 1
    assert value(after, "vllm:kv_cache_usage_perc") == 0 and value(after, "vllm:num_requests_running") == 0
    for families in (during, after):
        assert value(families, "vllm:num_requests_waiting") == families["t2_queue_depth"].samples[0][2]
    (_, lora, stamp), = during["vllm:lora_requests_info"].samples
    assert f"{BASE_MODEL}:math" in lora["running_lora_adapters"].split(","), lora
    assert abs(stamp - time.time()) < 60, stamp
    assert int(lora["max_lora"]) >= 1
    (_, lora_after, _), = after["vllm:lora_requests_info"].samples
    assert lora_after["running_lora_adapters"] == "" and lora_after["waiting_lora_adapters"] == "", lora_after


def test_a_queued_adapter_request_is_listed_as_waiting(start_server):
    # One batch row: the second request on the expert waits while the first runs.
    proc = start_server("--max-batch", "1", name="one-row")
    payload = {"model": f"{BASE_MODEL}:code", "messages": [{"role": "user", "content": "Count to fifty."}],
               "max_tokens": 40, "stream": True, "ignore_eos": True}
    first = SseStream(proc.base_url, "/v1/chat/completions", payload)
    second_done = threading.Event()

    def second():
        post_json(proc.base_url, "/v1/chat/completions", {**payload, "stream": False, "max_tokens": 2})
        second_done.set()

    thread = threading.Thread(target=second)
    try:
        _into_decoding(first.events())
        thread.start()
        deadline = time.monotonic() + 30
        seen = None
        while time.monotonic() < deadline and not second_done.is_set():
            (_, seen, _), = fetch_metrics(proc.base_url)["vllm:lora_requests_info"].samples
            if seen["waiting_lora_adapters"]:
                break
            time.sleep(0.05)
        assert seen and seen["waiting_lora_adapters"] == f"{BASE_MODEL}:code", seen
        assert seen["running_lora_adapters"] == f"{BASE_MODEL}:code", seen
    finally:
        first.close()
        thread.join(timeout=120)


# ---------------------------------------------------------------------------------------------------------
# Replicas converge on experts added to the shared store by restarting


def test_a_restarted_replica_serves_experts_added_to_the_shared_store(experts_dir, log_dir, tmp_path):
    volume = tmp_path / "experts-volume"
    shutil.copytree(experts_dir, volume)
    replica = ServerProcess(volume, log_dir, name="replica-before").start()
    try:
        run_t2("experts", "synth", "--experts-dir", str(volume), "--name", "physics", "--seed", "11",
               "--category", "physics")
        ask = {"model": f"{BASE_MODEL}:physics", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        # Loaded at start: the running replica does not know the new expert yet.
        assert post_json(replica.base_url, "/v1/chat/completions", ask).status == 404
    finally:
        assert replica.stop() == 0
    restarted = ServerProcess(volume, log_dir, name="replica-after").start()
    try:
        models = {m["id"] for m in http_request(restarted.base_url, "GET", "/v1/models").json()["data"]}
        assert f"{BASE_MODEL}:physics" in models
        resp = post_json(restarted.base_url, "/v1/chat/completions", ask)
        assert resp.status == 200, resp
        assert resp.headers["x-t2-mix"] == "expert:physics"
    finally:
        restarted.stop()
