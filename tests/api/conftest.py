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
    def __init__(self, args, log_name):
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kiln-test-{log_name}-{os.getpid()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

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
    def __init__(self, name, *extra):
        self.grpc = f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}"
        super().__init__(
            [str(BIN / "kiln-worker"), "serve", "-m", MODEL, "--grpc", self.grpc,
             "--metrics", self.metrics_url.removeprefix("http://"), *extra],
            f"worker-{name}",
        )
        wait_until(lambda: httpx.get(f"{self.metrics_url}/health").status_code == 200, 300, f"worker {name}")

    def metric(self, name):
        """The value of an unlabelled-by-group metric, summed over its series."""
        text = httpx.get(f"{self.metrics_url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


class Router(Process):
    def __init__(self, name, workers, *extra, wait=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [str(BIN / "kiln-router"), "--workers", ",".join(workers), "--port", str(self.port), *extra],
            f"router-{name}",
        )
        if wait:
            wait_until(lambda: httpx.get(f"{self.url}/health").status_code == 200, 60, f"router {name}")
        else:
            wait_until(lambda: httpx.get(f"{self.url}/health").status_code in (200, 503), 60, f"router {name}")


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
