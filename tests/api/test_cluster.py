"""Cluster behaviour: API keys, backpressure, cancellation on disconnect, failover, draining,
metrics."""
import signal
import threading
import time

import anthropic
import grpc
import httpx2 as httpx
import openai
import pytest

from conftest import Router, Worker, wait_until

MSG = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def test_api_key_is_required_when_set(worker, model):
    r = Router("keyed", [worker.grpc], "--api-key", "sekrit")
    try:
        wrong = openai.OpenAI(base_url=f"{r.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=model, messages=MSG, max_tokens=1)
        assert httpx.post(f"{r.url}/v1/chat/completions", json={"model": model, "messages": MSG}).status_code == 401
        ok = openai.OpenAI(base_url=f"{r.url}/v1", api_key="sekrit", max_retries=0)
        assert ok.chat.completions.create(model=model, messages=MSG, max_tokens=1).choices
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=r.url, api_key="wrong", max_retries=0).messages.create(
                model=model, max_tokens=1, messages=MSG)
        good = anthropic.Anthropic(base_url=r.url, api_key="sekrit", max_retries=0)
        assert good.messages.create(model=model, max_tokens=1, messages=MSG).content
        # Health and metrics stay open for probes and scrapers.
        assert httpx.get(f"{r.url}/health").status_code == 200
        assert httpx.get(f"{r.url}/metrics").status_code == 200
    finally:
        r.stop()


def test_api_key_from_a_mounted_file(worker, model, tmp_path):
    """A key in a file (a mounted secret), whitespace around it ignored; an empty file is an
    error at start rather than an open router."""
    key = tmp_path / "key"
    key.write_text("  from-a-file\n")
    r = Router("keyfile", [worker.grpc], "--api-key-file", str(key))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{r.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model=model, messages=MSG, max_tokens=1)
        ok = openai.OpenAI(base_url=f"{r.url}/v1", api_key="from-a-file", max_retries=0)
        assert ok.chat.completions.create(model=model, messages=MSG, max_tokens=1).choices
    finally:
        r.stop()
    key.write_text("\n")
    import subprocess
    from conftest import BIN
    out = subprocess.run([str(BIN / "kiln-router"), "--workers", worker.grpc, "--port", "0"], env={"KILN_API_KEY_FILE": str(key)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "is empty" in out.stderr, out.stderr


def test_cors_preflight(worker):
    r = Router("cors", [worker.grpc], "--api-key", "k", "--cors-allow-origin", "https://app.example")
    try:
        pre = httpx.options(f"{r.url}/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(f"{r.url}/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers
        # The MCP endpoint follows the same rules; browsers may end sessions and read their id.
        pre = httpx.options(f"{r.url}/mcp", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE",
                                                     "Access-Control-Request-Headers": "authorization, mcp-session-id, mcp-protocol-version"})
        assert pre.status_code == 204 and "DELETE" in pre.headers["access-control-allow-methods"]
        assert "mcp-session-id" in pre.headers["access-control-allow-headers"]
        listed = httpx.post(f"{r.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers={
            "Origin": "https://app.example", "Authorization": "Bearer k", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"})
        assert listed.headers["access-control-allow-origin"] == "https://app.example", listed.text
        assert listed.headers["access-control-expose-headers"] == "mcp-session-id"
    finally:
        r.stop()


def stream_in_thread(url, model, max_tokens, results):
    def run():
        body = {"model": model, "messages": MSG, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            results.append((r.status_code, "".join(r.iter_text())))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_queue_limit_answers_429(model):
    w = Worker("small", "--max-seqs", "1")
    r = Router("queue", [w.grpc], "--max-queue", "1")
    try:
        results = []
        threads = [stream_in_thread(r.url, model, 200, results) for _ in range(2)]
        wait_until(lambda: w.metric("kiln_worker_running_sequences") == 1 and w.metric("kiln_worker_waiting_sequences") == 1,
                   30, "one running and one waiting request")
        refused = httpx.post(f"{r.url}/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 1})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join()
        assert [s for s, _ in results] == [200, 200]
        assert all(text.rstrip().endswith("data: [DONE]") for _, text in results)
    finally:
        r.stop()
        assert w.stop() == 0


def test_disconnect_cancels_generation(worker, router, model):
    cancelled = worker.metric("kiln_worker_cancelled_total")
    body = {"model": model, "messages": MSG, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = 0
        for _ in r.iter_lines():
            chunks += 1
            if chunks > 6:
                break
    wait_until(lambda: worker.metric("kiln_worker_cancelled_total") == cancelled + 1, 10, "the worker to cancel")
    wait_until(lambda: worker.metric("kiln_worker_running_sequences") == 0, 10, "no running sequence")
    assert worker.metric("kiln_worker_kv_blocks_in_use") == 0
    # The same for a non-streamed request whose client gives up.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{router.url}/v1/chat/completions", timeout=1.0,
                   json={"model": model, "messages": MSG, "max_tokens": 3000, "ignore_eos": True})
    wait_until(lambda: worker.metric("kiln_worker_cancelled_total") == cancelled + 2, 10, "the worker to cancel")


def test_failover_when_a_worker_dies(worker, model):
    doomed = Worker("doomed")
    # The doomed worker is listed first, so it is picked while both look idle.
    r = Router("failover", [doomed.grpc, worker.grpc])
    try:
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model=model, messages=MSG, max_tokens=2).choices
        doomed.stop(signal.SIGKILL)
        for _ in range(4):
            out = client.chat.completions.create(model=model, messages=MSG, max_tokens=2, temperature=0)
            assert out.choices[0].message.content
        wait_until(lambda: f'kiln_router_worker_up{{worker="{doomed.grpc}"}} 0' in httpx.get(f"{r.url}/metrics").text, 10,
                   "the router to mark the dead worker down")
    finally:
        r.stop()


def test_no_worker_means_503(model):
    r = Router("lonely", ["127.0.0.1:1"], wait=False)
    try:
        assert httpx.get(f"{r.url}/health").status_code == 503
        # Alive all the same: an orchestrator must not restart routers for their workers' state.
        assert httpx.get(f"{r.url}/live").status_code == 200
        resp = httpx.post(f"{r.url}/v1/chat/completions", json={"model": model, "messages": MSG})
        assert resp.status_code == 503
        assert "no worker" in resp.json()["error"]["message"]
    finally:
        assert r.stop() == 0


def grpc_health(address, service):
    """grpc.health.v1.Health/Check, the request and answer encoded by hand: the status name."""
    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        answer = check(request, timeout=5)
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}.get(answer, repr(answer))


def serving(address):
    try:
        return grpc_health(address, "kiln.v1.Worker") == "SERVING"
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        return False


def test_sigterm_drains_router_and_worker(model):
    w = Worker("drain")
    # Kubernetes' gRPC probes: alive, and ready for kiln.v1.Worker while a model is loaded.
    assert grpc_health(w.grpc, "") == "SERVING" and grpc_health(w.grpc, "kiln.v1.Worker") == "SERVING"
    with pytest.raises(grpc.RpcError) as unknown:
        grpc_health(w.grpc, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # A grace period no busy machine runs out of: what is tested is that draining waits.
    r = Router("drain", [w.grpc], "--grace-secs", "300")
    results = []
    t = stream_in_thread(r.url, model, 400, results)
    wait_until(lambda: w.metric("kiln_worker_running_sequences") == 1, 30, "the request to start")
    r.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Draining: the listener stays open for probes, /health says so, new work goes elsewhere,
    # and the running stream goes on.
    health = httpx.get(f"{r.url}/health")
    assert health.status_code == 503 and "draining" in health.text
    assert httpx.get(f"{r.url}/live").status_code == 200
    refused = httpx.post(f"{r.url}/v1/chat/completions", json={"model": model, "messages": MSG})
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert r.proc.poll() is None and w.metric("kiln_worker_running_sequences") == 1
    t.join()
    assert results[0][0] == 200 and results[0][1].rstrip().endswith("data: [DONE]")
    # Once nothing is in flight the router exits by itself.
    wait_until(lambda: r.proc.poll() is not None, 10, "the router to exit after draining")
    assert r.stop() == 0
    # The worker likewise finishes a running generation before exiting.
    r2 = Router("drain2", [w.grpc])
    results.clear()
    t = stream_in_thread(r2.url, model, 60, results)
    wait_until(lambda: w.metric("kiln_worker_running_sequences") == 1, 30, "the request to start")
    w.proc.send_signal(signal.SIGTERM)
    # Out of rotation at once: readiness fails (NOT_SERVING, then no new connections) while
    # the running stream finishes.
    wait_until(lambda: not serving(w.grpc), 5, "the worker to stop reporting SERVING while draining")
    t.join()
    assert results[0][0] == 200 and results[0][1].rstrip().endswith("data: [DONE]")
    assert w.stop() == 0
    r2.stop()


def test_router_metrics(router, oai, model):
    oai.chat.completions.create(model=model, messages=MSG, max_tokens=3)
    httpx.post(f"{router.url}/v1/chat/completions", json={"model": model, "messages": []})
    text = httpx.get(f"{router.url}/metrics").text
    assert f'kiln_router_requests_total{{route="/v1/chat/completions",model="{model}",status="200"}}' in text
    assert "kiln_router_time_to_first_token_seconds_bucket" in text
    assert "kiln_router_inter_token_latency_seconds_count" in text
    assert f'kiln_router_generated_tokens_total{{model="{model}"}}' in text
    assert f'kiln_router_requests_total{{route="/v1/chat/completions",model="{model}",status="400"}}' in text
