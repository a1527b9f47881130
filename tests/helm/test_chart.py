"""helm/kiln checked with real software: helm 3.17's `lint --strict` and `template` for the
default values and each value set in tests/helm/values, every rendered object validated
strictly against Kubernetes 1.30's schemas (kubernetes-validate), every reference inside the
release resolved, every flag the chart sets known to the binaries it sets it for, and the
Prometheus Operator objects checked with promtool. (tests/containers/test_helm.py runs the
rendered pods on Docker.)"""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from chart import CHART, RELEASE, ROOT, VALUE_SETS, by_kind, container_env, find, helm, matches, pod_templates, render, values_args

KUBERNETES = "1.30.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULLNAME = f"{RELEASE}"  # the release name contains the chart's name


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_strict(value_set):
    out = subprocess.run([helm(), "lint", "--strict", str(CHART), *values_args(value_set)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_validates_against_kubernetes(value_set):
    docs, _ = render(value_set)
    assert docs
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue  # CRDs: checked by the observability test
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({value_set}): {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{doc['kind']} ({doc['apiVersion']}) is not a Kubernetes {KUBERNETES} kind")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_references_inside_the_release_resolve(value_set):
    """Names that Kubernetes resolves at run time (ports by name, ConfigMaps, Secrets, claims,
    selectors, scale targets) point at something the release makes or the values name."""
    docs, _ = render(value_set)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if value_set != "default":
        values_file = yaml.safe_load((ROOT / f"tests/helm/values/{value_set}.yaml").read_text())
        external_secret = (values_file.get("auth") or {}).get("existingSecret")
    else:
        external_secret = values["auth"]["existingSecret"]
    pods = pod_templates(docs)
    assert pods
    for workload, spec, labels in pods:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert matches(workload["spec"]["selector"]["matchLabels"], labels), name
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                find(docs, "ConfigMap", v["configMap"]["name"])
            if "secret" in v and v["secret"]["secretName"] != external_secret:
                secret = find(docs, "Secret", v["secret"]["secretName"])
                for item in v["secret"].get("items", []):
                    assert item["key"] in secret["data"], (name, item)
        for c in spec.get("initContainers", []) + spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                handler = p.get("httpGet") or p.get("tcpSocket") or p.get("grpc")
                assert handler, (name, probe)
                port = handler["port"]
                assert port in ports or port in ports.values(), f"{name} {probe} uses port {port}, not one of {ports}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, f"{name}: mount {m['name']} has no volume"
            for src in c.get("envFrom", []):
                find(docs, "ConfigMap", src["configMapRef"]["name"])
        if workload["kind"] == "StatefulSet":
            headless = find(docs, "Service", workload["spec"]["serviceName"])
            assert headless["spec"]["clusterIP"] == "None"
    for svc in by_kind(docs, "Service"):
        targets = [(spec, labels) for _, spec, labels in pods if matches(svc["spec"]["selector"], labels)]
        assert targets, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for spec, _ in targets:
                names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert any(matches(pdb["spec"]["selector"]["matchLabels"], labels) for _, _, labels in pods), pdb["metadata"]["name"]
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        target = find(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "the autoscaler owns the replica count"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = find(docs, "Service", backend["name"])
                assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    for sm in by_kind(docs, "ServiceMonitor"):
        selected = [s for s in by_kind(docs, "Service") if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert selected, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            for s in selected:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, (sm["metadata"]["name"], s["metadata"]["name"])


def help_env_names(*command):
    out = subprocess.run([str(ROOT / "target/release" / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", out.stdout))


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_settings_are_flags_the_binaries_read(value_set):
    """Every KILN_* variable the chart sets is one the daemon reads (a misspelt name would be
    ignored silently, the flag keeping its default)."""
    docs, _ = render(value_set)
    known = {"router": help_env_names("kiln-router") | {"KILN_API_KEY_FILE"},
             "worker": help_env_names("kiln-worker", "serve")}
    assert "KILN_ROUTER_ETCD" in known["router"] and "KILN_WORKER_MAX_SEQS" in known["worker"]
    for workload, spec, _ in pod_templates(docs):
        for c in spec["containers"]:
            if c["name"] not in known:
                continue
            env = container_env(docs, c, {"metadata.name": "pod-0", "status.podIP": "10.0.0.1"})
            unknown = {k for k in env if k.startswith("KILN_") and k not in known[c["name"]]}
            assert not unknown, f"{workload['metadata']['name']}: {unknown} are not read by kiln-{c['name']}"


def test_default_values():
    docs, _ = render("default")
    router = find(docs, "Deployment", f"{FULLNAME}-router")
    c = router["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kiln-router"] and "--host=0.0.0.0" in c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/live" and c["readinessProbe"]["httpGet"]["path"] == "/health"
    env = container_env(docs, c, {})
    assert env["KILN_ROUTER_ETCD"] == f"http://{FULLNAME}-etcd:2379"
    assert "KILN_API_KEY_FILE" not in env
    worker = find(docs, "StatefulSet", f"{FULLNAME}-worker-cpu")
    spec = worker["spec"]["template"]["spec"]
    w = spec["containers"][0]
    env = container_env(docs, w, {"metadata.name": "kiln-worker-cpu-0", "status.podIP": "10.1.2.3"})
    assert env["KILN_WORKER_MODEL"] == "smollm2" and env["KILN_WORKER_LABELS"] == "pool=cpu"
    assert env["KILN_WORKER_ADVERTISE"] == "10.1.2.3:50051" and env["KILN_WORKER_ID"] == "kiln-worker-cpu-0"
    assert w["readinessProbe"]["grpc"] == {"port": 50051, "service": "kiln.v1.Worker"}
    assert spec["initContainers"][0]["command"] == ["kiln-worker", "pull", "smollm2"]
    assert worker["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "nvidia.com/gpu" not in json.dumps(worker)
    etcd = find(docs, "StatefulSet", f"{FULLNAME}-etcd")
    assert etcd["spec"]["replicas"] == 1
    assert f"--initial-cluster={FULLNAME}-etcd-0=http://{FULLNAME}-etcd-0.{FULLNAME}-etcd-peers:2380" in etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    assert find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-router")["spec"]["minReplicas"] == 2


def test_gpu_pool():
    docs, _ = render("gpu-pool")
    cpu = find(docs, "StatefulSet", f"{FULLNAME}-worker-cpu")["spec"]["template"]["spec"]
    gpu = find(docs, "StatefulSet", f"{FULLNAME}-worker-gpu")["spec"]["template"]["spec"]
    assert cpu["containers"][0]["image"] == "kiln-worker:dev" and "tolerations" not in cpu
    w = gpu["containers"][0]
    assert w["image"] == "kiln-worker-cuda:dev" and gpu["initContainers"][0]["image"] == "kiln-worker-cuda:dev"
    assert w["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": 1}
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"} in gpu["tolerations"]
    env = container_env(docs, w, {"metadata.name": "p", "status.podIP": "10.0.0.2"})
    assert env["KILN_WORKER_MODEL"] == "gemma3" and env["KILN_WORKER_KV_CACHE_MB"] == "8192" and env["KILN_WORKER_MAX_SEQS"] == "64"
    assert env["KILN_WORKER_LABELS"] == "pool=gpu,accelerator=h100"
    claim = find(docs, "StatefulSet", f"{FULLNAME}-worker-gpu")["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd" and claim["resources"]["requests"]["storage"] == "40Gi"


def test_external_etcd():
    docs, _ = render("external-etcd")
    assert not [d for d in docs if d["metadata"]["name"].startswith(f"{FULLNAME}-etcd")]
    endpoints = "http://etcd-0.infra:2379,http://etcd-1.infra:2379,http://etcd-2.infra:2379"
    router = find(docs, "ConfigMap", f"{FULLNAME}-router")["data"]
    worker = find(docs, "ConfigMap", f"{FULLNAME}-worker-cpu")["data"]
    assert router["KILN_ROUTER_ETCD"] == endpoints and worker["KILN_WORKER_ETCD"] == endpoints
    assert router["KILN_ROUTER_ETCD_PREFIX"] == "/kiln-prod/v1/" and worker["KILN_WORKER_ETCD_PREFIX"] == "/kiln-prod/v1/"


def test_autoscaling_off():
    docs, _ = render("autoscaling-off")
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "PodDisruptionBudget")
    assert find(docs, "Deployment", f"{FULLNAME}-router")["spec"]["replicas"] == 3
    pool = find(docs, "Deployment", f"{FULLNAME}-worker-shared")
    spec = pool["spec"]["template"]["spec"]
    assert pool["spec"]["replicas"] == 3 and "initContainers" not in spec
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "kiln-models"}} in spec["volumes"]


def test_api_keys():
    docs, _ = render("api-keys")
    secret = find(docs, "Secret", f"{FULLNAME}-api-key")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "test-key-4f1c"
    spec = find(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]
    env = container_env(docs, spec["containers"][0], {})
    mount = spec["containers"][0]["volumeMounts"][0]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert env["KILN_API_KEY_FILE"] == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    ingress = find(docs, "Ingress", f"{FULLNAME}-router")
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["tls"][0]["secretName"] == "llm-example-tls"
    # The key's checksum rolls the routers when it changes.
    other, _ = render("api-keys", ["auth.apiKey=rotated"])
    before = find(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = find(other, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert before != after


def test_mcp_servers_reach_the_router_as_its_config_file():
    docs, _ = render("observability")
    secret = find(docs, "Secret", f"{FULLNAME}-router-mcp")
    config = json.loads(base64.b64decode(secret["data"]["mcp.json"]))
    assert config == {"mcpServers": {"search": {"url": "http://mcp-search.tools:8000/mcp", "headers": {"Authorization": "Bearer search-token"}}}}
    router = find(docs, "Deployment", f"{FULLNAME}-router")
    spec = router["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = container_env(docs, c, {})
    mount = next(m for m in c["volumeMounts"] if m["name"] == "mcp-config")
    volume = next(v for v in spec["volumes"] if v["name"] == "mcp-config")
    assert env["KILN_ROUTER_MCP_CONFIG"] == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert env["KILN_ROUTER_MAX_TOOL_ROUNDS"] == "4" and volume["secret"]["secretName"] == secret["metadata"]["name"]
    # The router reads the rendered file as it is: it starts and reports the server (down
    # here, as nothing answers at its URL).
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mcp.json"
        path.write_text(json.dumps(config))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env_vars = {**os.environ, "KILN_ROUTER_MCP_CONFIG": str(path), "KILN_ROUTER_MCP_CONNECT_TIMEOUT_SECS": "0.5"}
        proc = subprocess.Popen([str(ROOT / "target/release/kiln-router"), "--workers", "127.0.0.1:1", "--port", str(port)], env=env_vars,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            health = ""
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                except urllib.error.HTTPError as e:  # 503: no worker
                    health = e.read().decode()
                    break
                except OSError:
                    time.sleep(0.1)
            assert "mcp search: down for" in health, health
        finally:
            proc.kill()
            proc.wait()
    # Without servers there is no config, mount or Secret.
    default, _ = render("default")
    assert not [d for d in by_kind(default, "Secret") if d["metadata"]["name"].endswith("-router-mcp")]
    assert "KILN_ROUTER_MCP_CONFIG" not in container_env(default, find(default, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]["containers"][0], {})


def test_observability_objects():
    docs, _ = render("observability")
    rule = find(docs, "PrometheusRule", FULLNAME)
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is installed by scripts/deps.sh --with-etcd"
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rule["spec"], f)
        f.flush()
        out = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    jobs = {sm["metadata"]["name"]: sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for sm in by_kind(docs, "ServiceMonitor")}
    # The job labels the alert rules and dashboards select on.
    assert jobs == {f"{FULLNAME}-router": "kiln-router", f"{FULLNAME}-worker": "kiln-worker"}
    assert 'job="kiln-worker"' in (ROOT / "deploy/prometheus/rules.yml").read_text()
    dashboards = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"}
    files = sorted((ROOT / "deploy/grafana").glob("*.json"))
    assert len(dashboards) == len(files) == 4
    for path in files:
        cm = dashboards[f"{FULLNAME}-dashboard-{path.stem.removeprefix('kiln-')}"]
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
        assert len(json.dumps(cm)) < 1 << 20, "a ConfigMap holds at most 1 MiB"
    etcd = find(docs, "StatefulSet", f"{FULLNAME}-etcd")
    members = next(a for a in etcd["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--initial-cluster="))
    assert members.count("=http://") == 3 and etcd["spec"]["replicas"] == 3
    placed = find(docs, "StatefulSet", f"{FULLNAME}-worker-placed")["spec"]["template"]["spec"]
    env = container_env(docs, placed["containers"][0], {"metadata.name": "p", "status.podIP": "10.0.0.3"})
    assert "KILN_WORKER_MODEL" not in env and "initContainers" not in placed
    assert placed["containers"][0]["readinessProbe"]["grpc"]["service"] == ""
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment=staging"


@pytest.mark.parametrize("extra, error", [
    (["workerPools[0].name=cpu", "workerPools[0].gpu.enabled=true", "workerPools[0].gpu.tensorParallelSize=2", "workerPools[0].gpu.count=2"],
     "needs NCCL"),
    (["workerPools[0].name=cpu", "workerPools[0].kind=Deployment"], "needs kind StatefulSet"),
    (["workerPools[0].name=a", "workerPools[1].name=a"], "is used twice"),
    (["auth.enabled=true"], "give auth.apiKey"),
    (["etcd.bundled=false"], "give etcd.external.endpoints"),
    (["etcd.replicas=2"], "etcd.replicas must be one of"),
    (["router.policy=fastest"], "router.policy must be one of"),
    (["router.maxQueu=3"], "maxQueu"),
    (["workerPools[0].name=Bad_Name"], "workerPools.0.name"),
])
def test_values_that_cannot_work_are_refused(extra, error):
    _, out = render("default", extra, check=False)
    assert out.returncode != 0, f"{extra} rendered"
    assert error in out.stderr, out.stderr
