"""Every expression of every Grafana dashboard panel (deploy/grafana) and every metric the
alert rules name return data from a real Prometheus (Debian's package) scraping a live
cluster: etcd, two workers and a router, after traffic that exercises each panel (chats and
streams, a burst refused with 429, a worker stopped mid-stream so a generation stalls and is
resumed on the other). No dangling panels, no misspelled metrics."""
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from conftest import MODEL, Etcd, Process, Router, Worker, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
MSG = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def stream(router, tokens, out):
    body = {"model": MODEL, "messages": MSG, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, timeout=120) as r:
        out.append((r.status_code, "".join(r.iter_text())))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboards")
    etcd = Etcd("dash", tmp / "etcd")
    etcd.wait_ready()
    workers = [Worker(f"dash-{i}", "--max-seqs", "1", etcd=etcd.url) for i in range(2)]
    # An MCP server that cannot start, so the MCP series (and their alert) have data.
    mcp = tmp / "mcp.json"
    mcp.write_text('{"mcpServers": {"absent": {"command": "/nonexistent/mcp-server"}}}')
    router = Router("dash", [], "--max-queue", "1", "--stall-timeout-secs", "2", "--eject-secs", "2", "--mcp-config", str(mcp), etcd=etcd.url)
    wait_until(lambda: len(re.findall(r'^kiln_router_worker_up\{.*\} 1$', httpx.get(f"{router.url}/metrics").text, re.M)) == 2, 60,
               "the router to see both workers up")
    port = free_port()
    config = tmp / "prometheus.yml"
    targets = {"kiln-router": [router.url.removeprefix("http://")], "kiln-worker": [w.metrics_url.removeprefix("http://") for w in workers]}
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()],
    }))
    prom = Process(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"], "prometheus")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/-/ready").status_code == 200, 30, "Prometheus")
    try:
        traffic(router, workers)
        time.sleep(3)  # scraped after the last request
        yield url
    finally:
        prom.stop()
        router.stop()
        for w in workers:
            w.stop()
        etcd.stop()


def traffic(router, workers):
    chat = {"model": MODEL, "messages": MSG, "max_tokens": 8, "temperature": 0}
    for _ in range(3):
        assert httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    # Both workers busy and one request queued: the next is refused with 429.
    results = []
    threads = [threading.Thread(target=stream, args=(router, 120, results)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(w.metric("kiln_worker_running_sequences") for w in workers) == 2, 30, "both workers busy")
    except TimeoutError:
        pytest.fail(f"both workers were never busy at once\n{cluster_state(router, workers, results)}")
    refused = []
    wait_until(lambda: refused.append(httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=60).status_code) or refused[-1] == 429,
               30, "a 429")
    for t in threads:
        t.join(120)
    # A worker stopped mid-stream: the stream stalls, is resumed on the other, and finishes.
    results.clear()
    t = threading.Thread(target=stream, args=(router, 120, results))
    t.start()
    wait_until(lambda: any(w.metric("kiln_worker_running_sequences") for w in workers), 30, "the stream to start")
    busy = next(w for w in workers if w.metric("kiln_worker_running_sequences"))
    busy.proc.send_signal(signal.SIGSTOP)
    try:
        t.join(120)
    finally:
        busy.proc.send_signal(signal.SIGCONT)
    assert results and results[0][0] == 200 and results[0][1].rstrip().endswith("data: [DONE]"), results


def cluster_state(router, workers, results):
    """What the router and workers say, for a failure message: the streams' statuses, the
    router's routing gauges, each process's last log lines."""
    gauges = [line for line in httpx.get(f"{router.url}/metrics").text.splitlines()
              if line.startswith(("kiln_router_worker_", "kiln_router_in_flight"))]
    logs = [f"--- {p.log_path.name}\n" + "\n".join(p.log_text().splitlines()[-25:]) for p in (router, *workers)]
    return "\n".join([f"streams: {[(status, body[-300:]) for status, body in results]}", *gauges, *logs])


def query(url, expr):
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert r["status"] == "success", f"{expr}: {r}"
    return r["data"]["result"]


def panel_exprs():
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


def test_dashboards_are_well_formed():
    assert [p.name for p in DASHBOARDS] == ["kiln-failover.json", "kiln-overview.json", "kiln-router.json", "kiln-worker.json"]
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        names = [v["name"] for v in board["templating"]["list"]]
        assert names == ["datasource", "model", "instance"], (path.name, names)
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
        assert all(t["datasource"]["uid"] == "${datasource}" for p in board["panels"] for t in p["targets"])


def test_every_panel_returns_data(live):
    empty, count = [], 0
    for board, title, expr in panel_exprs():
        concrete = expr.replace("$model", ".*").replace("$instance", ".*").replace("$__rate_interval", "1m")
        count += 1
        if not query(live, concrete):
            empty.append(f"{board} / {title}: {expr}")
    print(f"\n{count} panel expressions over {len(DASHBOARDS)} dashboards evaluated against the live scrape, {len(empty)} empty")
    assert not empty, "\n".join(empty)


def test_every_metric_the_alert_rules_name_exists(live):
    names = set(re.findall(r"\b(kiln_[a-z_]+|up)\b", RULES.read_text()))
    missing = [n for n in sorted(names) if not query(live, f'count({{__name__="{n}"}})')]
    assert not missing, missing
    rules = httpx.get(f"{live}/api/v1/rules", timeout=30).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in rules for r in g["rules"]}
    assert len(health) == len(re.findall(r"- alert: ", RULES.read_text())) == 8 and all(h == "ok" for h, _ in health.values()), health
    print(f"\n{len(names)} metrics named by {len(health)} alert rules all present; every rule evaluates")
