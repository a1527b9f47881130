"""Starts kiln workers and routers on the default model for the API tests.

The binaries come from target/release (built by `make test`); the model is fetched by the
worker on first use. Every process gets free ports and is stopped at the end of the session.
"""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("KILN_BIN_DIR", ROOT / "target" / "release"))
MODEL = os.environ.get("KILN_TEST_MODEL", "smollm2")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class Process:
    def __init__(self, args, log_name, env=None):
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kiln-test-{log_name}-{os.getpid()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env})

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Worker(Process):
    """A worker on the test model; with `etcd`, registered in that cluster as `name`
    (and, with model=None, waiting for placement)."""

    def __init__(self, name, *extra, etcd=None, model=MODEL, lease_ttl=3, env=None):
        self.name = name
        self.grpc = f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}"
        args = [str(BIN / "kiln-worker"), "serve", "--grpc", self.grpc, "--metrics", self.metrics_url.removeprefix("http://")]
        if model:
            args += ["-m", model]
        if etcd:
            args += ["--etcd", etcd, "--worker-id", name, "--lease-ttl", str(lease_ttl)]
        super().__init__(args + list(extra), f"worker-{name}", env)
        wait_until(lambda: httpx.get(f"{self.metrics_url}/health").status_code == 200, 300, f"worker {name}")

    def metric(self, name):
        """The value of an unlabelled-by-group metric, summed over its series."""
        text = httpx.get(f"{self.metrics_url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


class Router(Process):
    def __init__(self, name, workers, *extra, wait=True, etcd=None, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(BIN / "kiln-router"), "--port", str(self.port)]
        if workers:
            args += ["--workers", ",".join(workers)]
        if etcd:
            args += ["--etcd", etcd]
        super().__init__(args + list(extra), f"router-{name}", env)
        if wait:
            wait_until(lambda: httpx.get(f"{self.url}/health").status_code == 200, 60, f"router {name}")
        else:
            wait_until(lambda: httpx.get(f"{self.url}/health").status_code in (200, 503), 60, f"router {name}")


class Etcd(Process):
    """One etcd member on loopback (Debian's etcd-server); `peers` makes a multi-member cluster."""

    def __init__(self, name, data_dir, client_port=None, peer_port=None, initial_cluster=None):
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.data_dir = data_dir
        self.initial = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        args = ["etcd", "--name", name, "--data-dir", str(data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", self.initial,
                "--initial-cluster-state", "new", "--initial-cluster-token", "kiln-test"]
        super().__init__(args, f"etcd-{name}")

    def wait_ready(self, timeout=30):
        wait_until(lambda: httpx.get(f"{self.url}/health", timeout=2).json().get("health") == "true", timeout, f"etcd {self.name}")

    def restart(self):
        """Starts the member again on the same ports and data."""
        return Etcd(self.name, self.data_dir, self.client_port, self.peer_port, self.initial)


@pytest.fixture(scope="session")
def worker():
    w = Worker("main")
    yield w
    w.stop()


@pytest.fixture(scope="session")
def router(worker):
    r = Router("main", [worker.grpc])
    yield r
    r.stop()


@pytest.fixture(scope="session")
def oai(router):
    import openai
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def claude(router):
    import anthropic
    return anthropic.Anthropic(base_url=router.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model():
    return MODEL
