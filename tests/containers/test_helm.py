"""The pods helm/kiln renders, run on Docker as a kubelet would run them: the rendered
commands, arguments, environment (ConfigMaps, Secrets, downward API, $(VAR) expansion),
volumes (Secrets as files, emptyDirs, claims with fsGroup ownership), users, read-only root
file systems, dropped capabilities and memory limits; init containers to completion first;
then every startup, liveness and readiness probe (HTTP, TCP and gRPC health) as the kubelet
sends it. Pods reach each other by the DNS names Kubernetes would give them (Service names and
StatefulSet pods' names under their governing Service). The cluster must come up healthy and
serve a request; stopping runs the preStop hooks and must end every daemon cleanly.

There is no Kubernetes here: scheduling, Services' load balancing, the autoscaler and the
Prometheus Operator are not exercised (docs/kubernetes.md)."""
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))
from chart import ROOT, container_env, expand, find, matches, pod_templates, render  # noqa: E402
from conftest import MODELS_DIR, run, wait_until  # noqa: E402

NETWORK = "kilnhelm"
SUBNET = "10.213.9"


def grpc_health(address, service, timeout):
    """grpc.health.v1.Health/Check by hand (HealthCheckRequest{service}); True when SERVING."""
    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return check(request, timeout=timeout) == b"\x08\x01"  # status: SERVING


def probe_once(probe, ip, ports):
    port = lambda p: ports.get(p, p)  # noqa: E731  a port given by name or number
    timeout = probe.get("timeoutSeconds", 1)
    if "httpGet" in probe:
        h = probe["httpGet"]
        try:
            with urllib.request.urlopen(f"http://{ip}:{port(h['port'])}{h['path']}", timeout=timeout) as r:
                return 200 <= r.status < 400
        except Exception:
            return False
    if "tcpSocket" in probe:
        try:
            socket.create_connection((ip, port(probe["tcpSocket"]["port"])), timeout=timeout).close()
            return True
        except OSError:
            return False
    if "grpc" in probe:
        try:
            return grpc_health(f"{ip}:{port(probe['grpc']['port'])}", probe["grpc"].get("service", ""), timeout)
        except grpc.RpcError:
            return False
    raise AssertionError(f"a probe the test cannot send: {probe}")


class Kubelet:
    """Runs the pods of one rendered release as containers on one Docker network."""

    def __init__(self, docs, tag):
        self.docs, self.tag = docs, tag
        self.tmp = Path(tempfile.mkdtemp(prefix="kiln-helm-"))
        self.containers, self.volumes, self.pods = [], [], []
        self.next_ip = 10
        run("docker", "network", "rm", NETWORK, check=False)
        run("docker", "network", "create", "--subnet", f"{SUBNET}.0/24", NETWORK)

    def close(self):
        for c in reversed(self.containers):
            run("docker", "rm", "-f", c, check=False)
        run("docker", "network", "rm", NETWORK, check=False)
        for v in self.volumes:
            run("docker", "volume", "rm", "-f", v, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def aliases(self, pod, labels, workload):
        names = {pod}
        for svc in (d for d in self.docs if d["kind"] == "Service"):
            if matches(svc["spec"]["selector"], labels):
                names.add(svc["metadata"]["name"])
                if workload["kind"] == "StatefulSet" and workload["spec"]["serviceName"] == svc["metadata"]["name"]:
                    names.add(f"{pod}.{svc['metadata']['name']}")
        return sorted(names)

    def volume_args(self, pod, workload, spec, claims_from):
        """docker -v/--tmpfs arguments per volume name, made as Kubernetes would make them."""
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        made = {}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for v in spec.get("volumes", []):
            if "emptyDir" in v or v["name"] in claims_from:
                made[v["name"]] = ("volume", self.claim(f"{pod}-{v['name']}", fs_group, claims_from.get(v["name"])))
            elif "secret" in v:
                secret = find(self.docs, "Secret", v["secret"]["secretName"])
                d = self.tmp / pod / v["name"]
                d.mkdir(parents=True)
                for item in v["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]:
                    f = d / item["path"]
                    f.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    f.chmod(0o644)  # the default mode of secret volumes
                d.chmod(0o755)
                made[v["name"]] = ("bind-ro", str(d))
            elif "persistentVolumeClaim" in v:
                raise AssertionError(f"{pod}: claim {v['persistentVolumeClaim']['claimName']} is made outside the chart; run a value set without it")
            else:
                raise AssertionError(f"{pod}: a volume the test cannot make: {v}")
        for name in claims:
            made[name] = ("volume", self.claim(f"{pod}-{name}", fs_group, claims_from.get(name)))
        return made

    def claim(self, name, fs_group, seed):
        """A fresh volume (a claim or an emptyDir), optionally filled from a host directory,
        group-owned by fsGroup and group-writable as the kubelet leaves it."""
        volume = f"kilnhelm-{name}"
        run("docker", "volume", "rm", "-f", volume, check=False)
        run("docker", "volume", "create", volume)
        self.volumes.append(volume)
        script = ""
        if seed:
            script += "cp -a /seed/. /v/ && "
        if fs_group is not None:
            script += f"chgrp -R {fs_group} /v && chmod -R g+rwX /v && chmod g+s /v && "
        script += "true"
        args = ["docker", "run", "--rm", "--user", "0", "--entrypoint", "bash", "-v", f"{volume}:/v"]
        if seed:
            args += ["-v", f"{seed}:/seed:ro"]
        run(*args, f"kiln-worker:{self.tag}", "-c", script, timeout=300)
        return volume

    def run_args(self, pod, ip, aliases, spec, container, mounts, env):
        sc = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        args = ["--name", f"{pod}-{container['name']}", "--hostname", pod, "--network", NETWORK, "--ip", ip]
        for a in aliases:
            args += ["--network-alias", a]
        if "runAsUser" in sc:
            args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        if "fsGroup" in spec.get("securityContext", {}):
            args += ["--group-add", str(spec["securityContext"]["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        memory = container.get("resources", {}).get("limits", {}).get("memory")
        if memory:
            args += ["--memory", memory.replace("Gi", "g").replace("Mi", "m")]
        for m in container.get("volumeMounts", []):
            kind, src = mounts[m["name"]]
            ro = ":ro" if m.get("readOnly") or kind == "bind-ro" else ""
            args += ["-v", f"{src}:{m['mountPath']}{ro}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        command = [expand(a, env) for a in container["command"] + container.get("args", [])]
        image = container["image"]
        return args + ["--entrypoint", command[0], image] + command[1:]

    def start(self, workload, replicas=None, seed=None):
        """Starts the pods of `workload` (all replicas unless told), init containers first."""
        spec, labels = workload["spec"]["template"]["spec"], workload["spec"]["template"]["metadata"]["labels"]
        n = workload["spec"].get("replicas", 1) if replicas is None else replicas
        started = []
        for i in range(n):
            pod = f"{workload['metadata']['name']}-{i}"
            ip = f"{SUBNET}.{self.next_ip}"
            self.next_ip += 1
            mounts = self.volume_args(pod, workload, spec, seed or {})
            fields = {"metadata.name": pod, "status.podIP": ip}
            aliases = self.aliases(pod, labels, workload)
            for init in spec.get("initContainers", []):
                env = container_env(self.docs, init, fields)
                name = f"{pod}-{init['name']}"
                self.containers.append(name)
                out = run("docker", "run", *self.run_args(pod, ip, [], spec, init, mounts, env), check=False, timeout=600)
                assert out.returncode == 0, f"init container {name} failed: {out.stderr[-2000:]}"
                run("docker", "rm", name)
                self.containers.remove(name)
            for c in spec["containers"]:
                env = container_env(self.docs, c, fields)
                self.containers.append(f"{pod}-{c['name']}")
                run("docker", "run", "-d", *self.run_args(pod, ip, aliases, spec, c, mounts, env))
            started.append((pod, ip, spec))
        self.pods += started
        return started

    def wait_healthy(self, started):
        """Sends each container's probes as the kubelet does: the startup probe within its
        failure budget, then liveness, then readiness (given the startup budget again)."""
        for pod, ip, spec in started:
            for c in spec["containers"]:
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                name = f"{pod}-{c['name']}"
                startup = c.get("startupProbe")
                budget = startup["periodSeconds"] * startup["failureThreshold"] if startup else 120
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = c.get(kind)
                    if probe:
                        wait_until(lambda: self.alive(name) and probe_once(probe, ip, ports), budget, f"{name} {kind} {json.dumps(probe)}",
                                   interval=probe.get("periodSeconds", 10) / 5)

    def alive(self, name):
        state = json.loads(run("docker", "inspect", "--format", "{{json .State}}", name).stdout)
        if not state["Running"]:
            logs = run("docker", "logs", "--tail", "30", name, check=False)
            raise AssertionError(f"{name} exited ({state['ExitCode']}): {logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        return True

    def stop(self, pod, spec):
        """preStop hooks, then SIGTERM with the pod's grace period; every container must exit 0."""
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            name = f"{pod}-{c['name']}"
            hook = c.get("lifecycle", {}).get("preStop", {}).get("exec")
            if hook:
                out = run("docker", "exec", name, *hook["command"], check=False, timeout=grace)
                assert out.returncode == 0, f"{name} preStop failed: {out.stderr}"
            run("docker", "stop", "-t", str(grace), name, timeout=grace + 30)
            code = run("docker", "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            assert code == "0", f"{name} ended with {code}: {run('docker', 'logs', '--tail', '20', name, check=False).stderr[-2000:]}"


@pytest.fixture(scope="module")
def tag():
    return "dev"


def workloads(docs, component):
    return [w for w, _, labels in pod_templates(docs) if labels["app.kubernetes.io/component"] == component]


def test_rendered_release_comes_up_and_serves(tag):
    """The api-keys value set (the defaults plus a key from a Secret): bundled etcd, both
    worker replicas (model cache seeded from the host, as a claim the pull init container
    finds filled), one router; then one chat request with the key, and a refusal without it."""
    docs, _ = render("api-keys")
    kubelet = Kubelet(docs, tag)
    try:
        [etcd] = workloads(docs, "etcd")
        kubelet.wait_healthy(kubelet.start(etcd))
        [pool] = workloads(docs, "worker-cpu")
        # The cache holds just the model the pool serves, where `kiln-worker pull` puts it.
        pulled = Path(run(str(ROOT / "target/release/kiln-worker"), "pull", "smollm2", timeout=600).stdout.strip())
        seed = kubelet.tmp / "models-seed"
        seed.mkdir()
        (seed / pulled.relative_to(MODELS_DIR)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pulled, seed / pulled.relative_to(MODELS_DIR))
        seed.chmod(0o755)
        workers = kubelet.start(pool, seed={"models": str(seed)})
        kubelet.wait_healthy(workers)
        [router_deployment] = workloads(docs, "router")
        routers = kubelet.start(router_deployment, replicas=1)
        kubelet.wait_healthy(routers)
        _, router_ip, _ = routers[0]
        url = f"http://{router_ip}:8080"
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}).encode()
        request = lambda headers: urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json", **headers})  # noqa: E731
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request({}), timeout=30)
        assert refused.value.code == 401
        with urllib.request.urlopen(request({"authorization": "Bearer test-key-4f1c"}), timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["content"].strip(), answer
        assert answer["usage"]["completion_tokens"] > 0
        # Both replicas registered under their pod names and pod addresses.
        router = f"{routers[0][0]}-router"
        listed = json.loads(run("docker", "exec", router, "kilnctl", "--etcd", f"http://{etcd['metadata']['name']}:2379", "workers", "--json").stdout)
        assert sorted((w["id"], w["addr"]) for w in listed) == sorted((pod, f"{ip}:50051") for pod, ip, _ in workers)
        for pod, _, spec in routers + workers:
            kubelet.stop(pod, spec)
    finally:
        kubelet.close()


def test_bundled_etcd_of_three_members_forms_a_cluster(tag):
    """observability's three etcd members, by their peer names alone: all become ready (their
    /health needs an elected leader) and list each other."""
    docs, _ = render("observability")
    kubelet = Kubelet(docs, tag)
    try:
        [etcd] = workloads(docs, "etcd")
        members = kubelet.start(etcd)
        kubelet.wait_healthy(members)
        # etcd's JSON gateway to its gRPC API (the image has no etcdctl).
        listing = urllib.request.Request(f"http://{members[0][1]}:2379/v3/cluster/member/list", data=b"{}", method="POST")
        with urllib.request.urlopen(listing, timeout=10) as r:
            names = sorted(m["name"] for m in json.loads(r.read())["members"])
        assert names == sorted(pod for pod, _, _ in members)
    finally:
        kubelet.close()
