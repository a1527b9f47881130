"""Faults in an etcd-coordinated cluster, with real processes: a real etcd (one member, or
three), workers registered under leases, two routers following etcd, and the official
openai client streaming through them. Each test prints what the fault cost."""
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx
import jsonschema
import openai
import pytest

from conftest import BIN, Etcd, Router, Worker, free_port, wait_until

QUESTIONS = [
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Explain how a bicycle stays upright.",
    "What do bees do in winter?",
    "How does a compass work?",
    "Tell me about the moon's phases.",
    "What makes bread rise?",
    "How do volcanoes form?",
]
TOKENS = 80
# Workers share the machine's cores: one thread each keeps them from fighting.
WORKER_ARGS = ("-t", "1", "--max-seqs", "16")
# Least-loaded spreads concurrent streams over every worker, so each fault hits some of them.
ROUTER_ARGS = ("--stall-timeout-secs", "3", "--eject-secs", "2", "--policy", "least-loaded")


def messages(q):
    return [{"role": "user", "content": q}]


def client(router):
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=120)


def reference(router, questions=QUESTIONS):
    """Fault-free greedy answers."""
    c = client(router)
    return [c.chat.completions.create(model="smollm2", messages=messages(q), max_tokens=TOKENS, temperature=0).choices[0].message.content
            for q in questions]


class Streams:
    """Concurrent greedy streams through a router, recording text and chunk arrival times."""

    def __init__(self, router, questions=QUESTIONS, max_tokens=TOKENS, model="smollm2"):
        self.texts = [""] * len(questions)
        self.times = [[] for _ in questions]
        self.errors = []
        self.done = [False] * len(questions)
        c = client(router)

        def run(i, q):
            try:
                stream = c.chat.completions.create(model=model, messages=messages(q), max_tokens=max_tokens, temperature=0, stream=True)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        self.texts[i] += chunk.choices[0].delta.content
                        self.times[i].append(time.monotonic())
                self.done[i] = True
            except Exception as e:  # reported by the test
                self.errors.append(f"stream {i}: {e!r}")

        self.threads = [threading.Thread(target=run, args=(i, q)) for i, q in enumerate(questions)]
        for t in self.threads:
            t.start()

    def chunks(self):
        return sum(len(t) for t in self.times)

    def join(self, timeout=120):
        for t in self.threads:
            t.join(timeout)
        return self

    def worst_gap(self):
        gaps = [b - a for ts in self.times for a, b in zip(ts, ts[1:])]
        return max(gaps, default=0.0)


def metrics(router):
    return httpx.get(f"{router.url}/metrics").text


def metric(router, line_prefix):
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics(router).splitlines() if l.startswith(line_prefix))


def router_sees(router, worker, up=True):
    return f'kiln_router_worker_up{{worker="{worker.name}"}} {1 if up else 0}' in metrics(router)


def busier(workers):
    return max(workers, key=lambda w: w.metric("kiln_worker_running_sequences"))


def kilnctl(etcd_url, *args):
    return subprocess.run([str(BIN / "kilnctl"), "--etcd", etcd_url, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    e = Etcd("solo", tmp_path_factory.mktemp("etcd-solo"))
    e.wait_ready()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def pair(etcd):
    """Two registered workers and a router following etcd."""
    a = Worker("a", *WORKER_ARGS, etcd=etcd.url)
    b = Worker("b", *WORKER_ARGS, etcd=etcd.url)
    r = Router("cluster", [], *ROUTER_ARGS, etcd=etcd.url)
    wait_until(lambda: router_sees(r, a) and router_sees(r, b), 30, "the router to see both workers")
    answers = reference(r)
    yield a, b, r, answers
    r.stop()
    for w in (a, b):
        w.stop()


def test_kill_9_mid_stream_resumes_every_stream(etcd, pair):
    a, b, r, answers = pair
    clean = Streams(r).join()
    assert not clean.errors and clean.texts == answers, "streamed greedy text equals the non-streamed one"
    victim = Worker("victim", *WORKER_ARGS, etcd=etcd.url)
    try:
        wait_until(lambda: router_sees(r, victim), 30, "the router to see the new worker")
        resumed_before = metric(r, "kiln_router_resumed_total")
        s = Streams(r)
        wait_until(lambda: s.chunks() >= 5 * len(QUESTIONS) and victim.metric("kiln_worker_running_sequences") > 0, 60,
                   "streams under way on the victim")
        on_victim = victim.metric("kiln_worker_running_sequences")
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        s.join()
        assert not s.errors, s.errors
        assert all(s.done)
        assert s.texts == answers, "every stream completes with the fault-free text, nothing lost or duplicated"
        resumed = metric(r, "kiln_router_resumed_total") - resumed_before
        assert resumed >= 1
        print(f"\n[fault] kill -9 with {int(on_victim)} of 8 streams on the victim: {int(resumed)} resumed, "
              f"worst gap between chunks {s.worst_gap() * 1e3:.0f} ms (fault-free {clean.worst_gap() * 1e3:.0f} ms), "
              f"last stream done {max(max(t) for t in s.times) - killed_at:.2f} s after the kill")
        wait_until(lambda: 'kiln_router_worker_up{worker="victim"}' not in metrics(r), 15, "the dead worker's lease to expire")
    finally:
        victim.stop(signal.SIGKILL)


SHOPPING = json.loads((Path(__file__).parent / "schemas" / "11_array_of_objects.json").read_text())


def constrained_stream(router, seed, out):
    """A streamed, sampled completion held to a JSON schema; its text lands in out[seed]."""
    body = {"model": "smollm2", "messages": messages(SHOPPING["prompt"]), "max_tokens": 300, "temperature": 1, "seed": seed, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": SHOPPING["schema"]}}}
    text = ""
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
    out[seed] = text


def test_kill_9_resumes_constrained_streams_inside_their_schema(etcd, pair):
    """The grammar's state is rebuilt on the second worker from the tokens already sent: every
    stream still validates and equals its fault-free run (same seed, same draws)."""
    a, b, r, _ = pair
    seeds = range(8)
    clean = {}
    for seed in seeds:
        constrained_stream(r, seed, clean)
    victim = Worker("victim-constrained", *WORKER_ARGS, etcd=etcd.url)
    try:
        wait_until(lambda: router_sees(r, victim), 30, "the router to see the new worker")
        resumed_before = metric(r, "kiln_router_resumed_total")
        got = {}
        threads = [threading.Thread(target=constrained_stream, args=(r, seed, got)) for seed in seeds]
        for t in threads:
            t.start()
        wait_until(lambda: victim.metric("kiln_worker_running_sequences") > 0 and victim.metric("kiln_worker_generated_tokens_total") >= 8, 60,
                   "constrained streams under way on the victim")
        victim.stop(signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert metric(r, "kiln_router_resumed_total") - resumed_before >= 1
        validator = jsonschema.Draft202012Validator(SHOPPING["schema"])
        for seed in seeds:
            validator.validate(json.loads(got[seed]))
        assert got == clean
    finally:
        victim.stop(signal.SIGKILL)


def test_sigstop_moves_requests_then_sigcont_rejoins(etcd, pair):
    a, b, r, answers = pair
    frozen = Worker("frozen", *WORKER_ARGS, etcd=etcd.url)
    try:
        wait_until(lambda: router_sees(r, frozen), 30, "the router to see the new worker")
        stalled_before = metric(r, "kiln_router_stalled_total")
        s = Streams(r)
        wait_until(lambda: s.chunks() >= 3 * len(QUESTIONS) and frozen.metric("kiln_worker_running_sequences") > 0, 60,
                   "streams under way on the worker to freeze")
        on_frozen = frozen.metric("kiln_worker_running_sequences")
        stopped_at = time.monotonic()
        frozen.proc.send_signal(signal.SIGSTOP)
        s.join()
        moved = time.monotonic() - stopped_at
        assert not s.errors, s.errors
        assert s.texts == answers
        assert metric(r, "kiln_router_stalled_total") > stalled_before
        print(f"\n[fault] SIGSTOP with {int(on_frozen)} streams on the worker: all done {moved:.2f} s later "
              f"(stall timeout 3 s), worst gap {s.worst_gap() * 1e3:.0f} ms")
        frozen.proc.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        wait_until(lambda: router_sees(r, frozen), 30, "the thawed worker to rejoin")
        print(f"[fault] SIGCONT: back in the router's pool after {time.monotonic() - resumed_at:.2f} s")
        served = frozen.metric("kiln_worker_completions_total")
        c = client(r)
        for i in range(24):
            c.chat.completions.create(model="smollm2", messages=messages(f"Count to {i}."), max_tokens=2, temperature=0)
            if frozen.metric("kiln_worker_completions_total") > served:
                break
        assert frozen.metric("kiln_worker_completions_total") > served, "the rejoined worker takes traffic again"
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.stop()


def test_new_worker_gets_traffic_and_drain_moves_it_away(etcd, pair):
    a, b, r, answers = pair
    # A long lease: leaving within 3 s below can only come from deregistering.
    c_worker = Worker("c", *WORKER_ARGS, etcd=etcd.url, lease_ttl=30)
    try:
        wait_until(lambda: router_sees(r, c_worker), 30, "the router to see the new worker without a restart")
        c = client(r)
        for i in range(24):
            c.chat.completions.create(model="smollm2", messages=messages(f"Name a colour, number {i}."), max_tokens=2, temperature=0)
            if c_worker.metric("kiln_worker_completions_total") > 0:
                break
        assert c_worker.metric("kiln_worker_completions_total") > 0, "the new worker receives traffic"

        s = Streams(r)
        wait_until(lambda: c_worker.metric("kiln_worker_running_sequences") > 0, 60, "streams on the worker to drain")
        out = kilnctl(etcd.url, "drain", "c")
        assert out.returncode == 0, out.stderr
        wait_until(lambda: 'kiln_router_worker_draining{worker="c"} 1' in metrics(r), 10, "the router to see the drain")
        s.join()
        assert not s.errors and s.texts == answers, "streams running on the drained worker finish"
        served = c_worker.metric("kiln_worker_completions_total")
        for i in range(12):
            c.chat.completions.create(model="smollm2", messages=messages(f"Name a fruit, number {i}."), max_tokens=2, temperature=0)
        assert c_worker.metric("kiln_worker_completions_total") == served, "a drained worker gets nothing new"
        listing = kilnctl(etcd.url, "workers")
        assert "draining" in listing.stdout, listing.stdout
        assert kilnctl(etcd.url, "undrain", "c").returncode == 0
        wait_until(lambda: 'kiln_router_worker_draining{worker="c"} 0' in metrics(r), 10, "the router to see the undrain")
    finally:
        c_worker.stop()
    # A clean shutdown deregisters at once, without waiting for the lease.
    wait_until(lambda: 'kiln_router_worker_up{worker="c"}' not in metrics(r), 3, "the stopped worker to leave")


def test_two_routers_agree_and_survive_each_other(etcd, pair):
    a, b, r, answers = pair
    r2 = Router("second", [], *ROUTER_ARGS, etcd=etcd.url)
    try:
        assert reference(r2, QUESTIONS[:3]) == answers[:3], "routers are interchangeable"
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait()
        assert reference(r2, QUESTIONS[3:4]) == answers[3:4], "the other router keeps serving"
    finally:
        r2.stop()


def test_placement_loads_reports_and_unloads(etcd):
    spare = Worker("spare", *WORKER_ARGS, etcd=etcd.url, model=None)
    r = Router("placement", [], *ROUTER_ARGS, etcd=etcd.url, wait=False)
    try:
        out = kilnctl(etcd.url, "place", "tiny-chat", "--source", "smollm2", "--replicas", "1", "--workers", "spare")
        assert out.returncode == 0, out.stderr
        wait_until(lambda: "tiny-chat" in httpx.get(f"{r.url}/health").text, 60, "the placed model to be served")
        reply = client(r).chat.completions.create(model="tiny-chat", messages=messages("Hi"), max_tokens=3)
        assert reply.choices[0].message.content
        out = kilnctl(etcd.url, "--json", "models")
        assert '"ready":1' in out.stdout.replace(" ", ""), out.stdout
        assert kilnctl(etcd.url, "unplace", "tiny-chat").returncode == 0
        assert kilnctl(etcd.url, "place", "broken", "--source", "/no/such/model.gguf", "--workers", "spare").returncode == 0
        wait_until(lambda: "no such file" in kilnctl(etcd.url, "models").stdout, 30, "the failed load to be reported")
        assert kilnctl(etcd.url, "unplace", "broken").returncode == 0
    finally:
        r.stop()
        spare.stop()


def test_kilnctl_says_when_etcd_is_unreachable():
    out = kilnctl(f"http://127.0.0.1:{free_port()}", "workers")
    assert out.returncode == 1
    assert "unreachable" in out.stderr and out.stderr.count("\n") == 1


def test_etcd_outage_keeps_routing_and_reconciles(tmp_path):
    e = Etcd("outage", tmp_path / "etcd")
    e.wait_ready()
    a = Worker("oa", *WORKER_ARGS, etcd=e.url)
    r = Router("outage", [], *ROUTER_ARGS, etcd=e.url)
    late = None
    try:
        e.stop()
        wait_until(lambda: "etcd: unreachable" in httpx.get(f"{r.url}/health").text, 15, "the router to notice")
        assert "kiln_router_etcd_connected 0" in metrics(r)
        reply = client(r).chat.completions.create(model="smollm2", messages=messages("Hi"), max_tokens=3)
        assert reply.choices[0].message.content, "routing continues from the last view"
        late = Worker("late", *WORKER_ARGS, etcd=e.url)
        time.sleep(1)
        assert 'kiln_router_worker_up{worker="late"}' not in metrics(r)
        down_at = time.monotonic()
        e = e.restart()
        e.wait_ready()
        wait_until(lambda: router_sees(r, late) and "kiln_router_etcd_connected 1" in metrics(r), 30,
                   "membership to reconcile")
        print(f"\n[fault] etcd restart: router view reconciled {time.monotonic() - down_at:.2f} s after etcd was started again")
        assert router_sees(r, a)
    finally:
        r.stop()
        a.stop()
        if late:
            late.stop()
        e.stop()


def test_one_etcd_member_of_three_down(tmp_path):
    names = ["m1", "m2", "m3"]
    peers = {n: free_port() for n in names}
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in peers.items())
    members = [Etcd(n, tmp_path / n, peer_port=peers[n], initial_cluster=initial) for n in names]
    for m in members:
        m.wait_ready(60)
    urls = ",".join(m.url for m in members)
    a = Worker("ta", *WORKER_ARGS, etcd=urls)
    r = Router("three", [], *ROUTER_ARGS, etcd=urls)
    late = None
    try:
        members[0].stop(signal.SIGKILL)
        late = Worker("tlate", *WORKER_ARGS, etcd=urls)
        wait_until(lambda: router_sees(r, late), 30, "a new worker to register with two members of three")
        assert "etcd: connected" in httpx.get(f"{r.url}/health").text
        # Settled on the members that answer: over three of the router's probe intervals and
        # six of the workers' keep-alives, no process loses etcd again (a client spreading its
        # requests over all three members would see a third of them fail).
        syncs = metric(r, "kiln_router_etcd_syncs")
        registrations = [w.log_text().count("registered in etcd as") for w in (a, late)]
        time.sleep(6)
        assert metric(r, "kiln_router_etcd_syncs") == syncs and metric(r, "kiln_router_etcd_connected") == 1
        assert [w.log_text().count("registered in etcd as") for w in (a, late)] == registrations
        reply = client(r).chat.completions.create(model="smollm2", messages=messages("Hi"), max_tokens=3)
        assert reply.choices[0].message.content
    finally:
        r.stop()
        a.stop()
        if late:
            late.stop()
        for m in members:
            m.stop()
