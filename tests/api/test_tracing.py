"""OpenTelemetry traces across router and worker, received by a real OTLP/gRPC collector
(a TraceService from the opentelemetry-proto package on grpcio): one request is one trace,
continuing the client's `traceparent`, with the router's and the worker's spans parented
through the gRPC call; a worker killed mid-stream shows as a failed call and a resumed one."""
import os
import signal
import subprocess
import threading
import time
from concurrent import futures

import grpc
import httpx2 as httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import MODEL, Router, Worker, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
# The router names a request's span after its method and route.
REQUEST_SPAN = "POST /v1/chat/completions"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Records every exported span as (service name, span)."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def env(self):
        # Exported within 100 ms of ending instead of the default 5 s.
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def named(self, name, trace=CLIENT_TRACE):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.name == name and s.trace_id.hex() == trace]


def attrs(span):
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value if v.HasField("int_value") else \
            v.double_value if v.HasField("double_value") else v.bool_value
    return out


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.stop(0)


def chat(router, stream=False, max_tokens=12):
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(f"{router.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_one_request_is_one_trace_across_router_and_worker(collector):
    worker = Worker("traced", env=collector.env())
    router = Router("traced", [worker.grpc], env=collector.env())
    try:
        r = chat(router)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        wait_until(lambda: collector.named(REQUEST_SPAN) and collector.named("worker.generate"), 20, "both daemons' spans")
        [(router_svc, request)] = collector.named(REQUEST_SPAN)
        [(_, call)] = collector.named("router.worker_call")
        [(worker_svc, generate)] = collector.named("worker.generate")
        assert (router_svc, worker_svc) == ("kiln-router", "kiln-worker")
        # The client's span -> the router's request -> its call to the worker -> the worker's span.
        assert request.parent_span_id.hex() == CLIENT_SPAN
        assert call.parent_span_id == request.span_id
        assert generate.parent_span_id == call.span_id
        assert request.kind == request.SPAN_KIND_SERVER and call.kind == call.SPAN_KIND_CLIENT and generate.kind == generate.SPAN_KIND_SERVER
        a = attrs(request)
        assert a["http.route"] == "/v1/chat/completions" and a["http.response.status_code"] == 200
        assert a["gen_ai.request.model"] == MODEL and a["kiln.policy"] == "prefix" and a["kiln.worker"] == worker.grpc
        assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] and a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert a["kiln.attempts"] == 1 and a["kiln.time_to_first_token_ms"] > 0
        assert attrs(call)["kiln.outcome"] == "finished"
        g = attrs(generate)
        assert g["kiln.prompt_tokens"] == usage["prompt_tokens"] and g["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert g["kiln.outcome"] == "length" and not g["kiln.resume"]
        # The router's span covers the worker's.
        assert request.start_time_unix_nano <= generate.start_time_unix_nano and generate.end_time_unix_nano <= request.end_time_unix_nano
        print(f"\none request, one trace {CLIENT_TRACE}: {REQUEST_SPAN} > router.worker_call > worker.generate; "
              f"router span {(request.end_time_unix_nano - request.start_time_unix_nano) / 1e6:.1f} ms, "
              f"worker span {(generate.end_time_unix_nano - generate.start_time_unix_nano) / 1e6:.1f} ms")
        # Probes and scrapes are not traced.
        httpx.get(f"{router.url}/health")
        httpx.get(f"{router.url}/metrics")
        time.sleep(0.5)
        with collector.lock:
            assert not [s for _, s in collector.spans if s.name.startswith("GET")]
    finally:
        router.stop()
        worker.stop()


def test_a_resume_on_a_second_worker_is_in_the_same_trace(collector):
    a, b = Worker("trace-a", env=collector.env()), Worker("trace-b", env=collector.env())
    router = Router("trace-failover", [a.grpc, b.grpc], "--stall-timeout-secs", "3", env=collector.env())
    trace = "1" * 32
    try:
        result = {}

        def stream():
            headers = {"traceparent": f"00-{trace}-{CLIENT_SPAN}-01"}
            # Long enough (no end-of-sequence) that the worker is still generating when it is
            # killed, however fast this machine decodes.
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
                result["text"] = "".join(r.iter_text())

        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: a.metric("kiln_worker_running_sequences") + b.metric("kiln_worker_running_sequences") > 0, 30, "the stream to start")
        busy, spare = (a, b) if a.metric("kiln_worker_running_sequences") > 0 else (b, a)
        wait_until(lambda: busy.metric("kiln_worker_generated_tokens_total") >= 8, 30, "a few tokens before the kill")
        busy.stop(signal.SIGKILL)
        t.join(120)
        assert "[DONE]" in result.get("text", ""), result
        wait_until(lambda: len(collector.named("router.worker_call", trace)) == 2 and collector.named(REQUEST_SPAN, trace)
                   and collector.named("worker.generate", trace), 20, "the resumed trace")
        [(_, request)] = collector.named(REQUEST_SPAN, trace)
        calls = sorted((s for _, s in collector.named("router.worker_call", trace)), key=lambda s: s.start_time_unix_nano)
        assert all(c.parent_span_id == request.span_id for c in calls)
        first, second = (attrs(c) for c in calls)
        assert first["kiln.worker"] == busy.grpc and calls[0].status.code == calls[0].status.STATUS_CODE_ERROR
        assert "resumed elsewhere" in first["kiln.outcome"]
        assert second["kiln.worker"] == spare.grpc and second["kiln.resume"] and second["kiln.outcome"] == "finished"
        # The surviving worker's span is the resumed call's child (the killed one exported nothing).
        resumed = [s for _, s in collector.named("worker.generate", trace) if attrs(s)["kiln.resume"]]
        assert len(resumed) == 1 and resumed[0].parent_span_id == calls[1].span_id
        assert attrs(request)["kiln.resumes"] == 1 and attrs(request)["kiln.attempts"] == 2
        # The failover's counters are well-formed metrics too.
        text = httpx.get(f"{router.url}/metrics").text
        assert "kiln_router_resumed_total" in text and "kiln_router_upstream_errors_total" in text
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
        print(f"\nworker killed mid-stream: trace {trace} holds the failed call to {busy.name} and the resumed one to {spare.name}")
    finally:
        router.stop()
        for w in (a, b):
            w.stop()
