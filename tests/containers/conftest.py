"""The Compose cluster (deploy/compose.yaml) for the container fault tests: etcd, workers,
two routers and HAProxy, each container on its own address of a Docker network, driven
through the load balancer with the official openai client.

The images come from `make images`; the model from the host's $KILN_HOME/models (mounted),
so no test fetches it. Faults are real: `docker kill`, and network cuts with `docker network
disconnect` (a container on the network loses every packet to and from the others)."""
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("KILN_TEST_PROJECT", "kilntest")
MODEL = "smollm2"
MODELS_DIR = Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln")) / "models"

QUESTIONS = [
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Explain how a bicycle stays upright.",
    "What do bees do in winter?",
    "How does a compass work?",
    "Tell me about the moon's phases.",
]
TOKENS = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
            last = "the check said no"
        except Exception as e:  # the thing waited for is not there yet
            last = repr(e)
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last})")


def run(*args, check=True, timeout=120):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def compose_command():
    """KILN_COMPOSE if set (as scripts/compose.sh), else Compose v2, else docker-compose v1."""
    if os.environ.get("KILN_COMPOSE"):
        return os.environ["KILN_COMPOSE"].split()
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


class Cluster:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.compose = compose_command() + ["-f", str(ROOT / "deploy/compose.yaml"), "-f", str(ROOT / "tests/containers/compose.test.yaml"), "-p", PROJECT]
        # Each worker gets one CPU where the host has room for three of them beside the rest
        # of the cluster; a smaller host gets equal shares it can honour (0.5 on 2 CPUs), so
        # no worker runs slower than another for want of a core.
        self.worker_cpus = min(1.0, round((os.cpu_count() - 0.5) / 3, 2))
        self.prometheus = f"http://127.0.0.1:{free_port()}"
        self.env = dict(os.environ, KILN_PORT=str(self.port), KILN_MODELS=str(MODELS_DIR), KILN_PROMETHEUS_PORT=self.prometheus.rsplit(":", 1)[1],
                        KILN_WORKER_CPUS=str(self.worker_cpus))
        self.network = f"{PROJECT}_default"

    def up(self, *args, timeout=300):
        out = subprocess.run(self.compose + ["up", "-d", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"compose up failed: {out.stderr[-3000:]}")

    def down(self):
        subprocess.run(self.compose + ["down", "--volumes", "--remove-orphans", "--timeout", "5"], env=self.env, capture_output=True, timeout=300)

    def containers(self, service, running=True):
        args = ["docker", "ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={PROJECT}",
                "--filter", f"label=com.docker.compose.service={service}"]
        if not running:
            args.append("--all")
        return sorted(run(*args).stdout.split())

    def container(self, service):
        names = self.containers(service, running=False)
        assert len(names) == 1, names
        return names[0]

    def ip(self, container):
        out = run("docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
        return json.loads(out)[self.network]["IPAddress"]

    def disconnect(self, container):
        """Cuts `container` off the cluster's network; returns what reconnect needs."""
        ip, alias = self.ip(container), run("docker", "inspect", "--format", '{{index .Config.Labels "com.docker.compose.service"}}', container).stdout.strip()
        run("docker", "network", "disconnect", self.network, container)
        return ip, alias

    def reconnect(self, container, cut):
        ip, alias = cut
        run("docker", "network", "connect", "--ip", ip, "--alias", alias, self.network, container)

    def http(self, container, port, path):
        """GET inside `container` (its ports are not published), through bash's /dev/tcp."""
        script = f"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        # Text mode has turned the answer's CRLFs into newlines.
        return run("docker", "exec", container, "bash", "-c", script).stdout.split("\n\n", 1)[-1]

    def metric(self, container, port, name):
        return sum(float(l.rsplit(" ", 1)[1]) for l in self.http(container, port, "/metrics").splitlines()
                   if l.startswith(name) and not l.startswith("#"))

    def kilnctl(self, *args):
        router = self.containers("router1")[0] if self.containers("router1") else self.containers("router2")[0]
        return run("docker", "exec", router, "kilnctl", "--etcd", "http://etcd:2379", *args)

    def workers(self):
        """Registered workers by id, as etcd has them."""
        return {w["id"]: w for w in json.loads(self.kilnctl("workers", "--json").stdout)}

    def worker_id(self, container):
        """The id a worker container registers under (host name and gRPC port)."""
        host = run("docker", "inspect", "--format", "{{.Config.Hostname}}", container).stdout.strip()
        return f"{host}-50051"

    def serving(self):
        """Whether a chat completion goes through the load balancer."""
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        return r.status_code == 200

    def router_sees(self, worker_ids):
        """Whether both routers list exactly these workers as up."""
        for router in ("router1", "router2"):
            for c in self.containers(router):
                text = self.http(c, 8080, "/metrics")
                up = {l.split('"')[1] for l in text.splitlines() if l.startswith("kiln_router_worker_up{") and l.endswith(" 1")}
                if up != set(worker_ids):
                    return False
        return True

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def reference(self, questions=QUESTIONS, tokens=TOKENS):
        c = self.client()
        return [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=tokens, temperature=0).choices[0].message.content
                for q in questions]


class Streams:
    """Concurrent greedy streams through the load balancer, each repeated `rounds` times."""

    def __init__(self, cluster, questions=QUESTIONS, tokens=TOKENS, rounds=1):
        self.results = []  # (question index, text)
        self.errors = []
        self.lock = threading.Lock()
        c = cluster.client()

        def one(i, q):
            for _ in range(rounds):
                text = ""
                try:
                    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=tokens, temperature=0, stream=True)
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            text += chunk.choices[0].delta.content
                    with self.lock:
                        self.results.append((i, text))
                except Exception as e:  # counted by the test
                    with self.lock:
                        self.errors.append(f"stream {i}: {e!r}")

        self.threads = [threading.Thread(target=one, args=(i, q)) for i, q in enumerate(questions)]
        for t in self.threads:
            t.start()

    def join(self, timeout=300):
        for t in self.threads:
            t.join(timeout)
        return self

    def altered(self, reference):
        return [(i, t) for i, t in self.results if t != reference[i]]


def report(*lines):
    print("\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def cluster():
    c = Cluster()
    c.down()
    c.up()
    try:
        wait_until(c.serving, 300, "the cluster to serve through the load balancer")
        workers = c.containers("worker")
        wait_until(lambda: c.router_sees([c.worker_id(w) for w in workers]), 60, "both routers to see every worker")
        yield c
    finally:
        if os.environ.get("KILN_KEEP_CLUSTER") != "1":
            c.down()
