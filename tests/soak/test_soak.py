"""Soak: one worker and one router on loopback. 64 streaming clients run for the whole test
while KILN_SOAK_REQUESTS other requests arrive (3,000 after a warm-up of 4,000 in `make test`;
`make test-full` sends 50,000): malformed JSON, wrong types, out-of-range values, unknown
models, prompts over the context, bodies over the limit, invalid UTF-8, uploads abandoned
half-way, streams dropped at random points, slow readers, `n` at its limit, and valid
requests of the OpenAI, Responses and Anthropic APIs. At the end every valid greedy answer
equals the reference run's, every bad request got its status and error shape, neither
process restarted, the worker's KV blocks in use and the router's in-flight gauge are back to
0, and both processes' resident memory (the worker's less the KV cache pages it has
written) and both live heaps are within 10% of what they were after warm-up.
"""
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from conftest import MODEL, Router, Worker, wait_until  # noqa: E402

OTHER_REQUESTS = int(os.environ.get("KILN_SOAK_REQUESTS", "3000"))
WARM_UP_REQUESTS = int(os.environ.get("KILN_SOAK_WARM_UP", "4000"))
REPORT = Path(__file__).resolve().parents[2] / "target" / "tmp" / "soak-report.txt"
STREAMERS = 64
CONCURRENCY = 24
MAX_BODY = 1 << 20
PROMPTS = [f"Write item {i} of a short list about {topic}." for i, topic in
           enumerate(["rivers", "stars", "bread", "maps", "clocks", "birds", "glass", "rain"])]


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(url, name):
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def chat_body(prompt, max_tokens, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, **extra}


class Soak:
    def __init__(self, router):
        self.url = router.url
        self.host, port = router.url.removeprefix("http://").split(":")
        self.port = int(port)
        self.ref = {}
        self.counts = Counter()
        self.failures = []
        self.stop_streamers = asyncio.Event()

    def fail(self, what):
        if len(self.failures) < 50:
            self.failures.append(what)
        self.counts["FAILED"] += 1

    async def reference(self, client):
        """Greedy answers computed one at a time, before any load."""
        for p in PROMPTS:
            for n in (8, 16):
                r = await client.post(f"{self.url}/v1/chat/completions", json=chat_body(p, n))
                self.ref[("chat", p, n)] = r.json()["choices"][0]["message"]["content"]
            r = await client.post(f"{self.url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                                                 "messages": [{"role": "user", "content": p}]})
            self.ref[("anthropic", p, 8)] = r.json()["content"][0]["text"]

    async def stream_text(self, client, body, slow=0.0, drop_after=None):
        """Streams a chat completion; returns its text (None when dropped on purpose)."""
        async with client.stream("POST", f"{self.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            text, chunks = [], 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    return None
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
                if slow:
                    await asyncio.sleep(slow)
            return "".join(text)

    async def streamer(self, index):
        rng = random.Random(index)
        async with httpx.AsyncClient(timeout=300) as client:
            while not self.stop_streamers.is_set():
                p = rng.choice(PROMPTS)
                try:
                    got = await self.stream_text(client, chat_body(p, 16))
                except httpx.HTTPError as e:
                    self.fail(f"streamer {index}: {e!r}")
                    continue
                if got == self.ref[("chat", p, 16)]:
                    self.counts["streamed, equal to the reference"] += 1
                else:
                    self.fail(f"streamer {index} {p!r}: {got!r} vs {self.ref[('chat', p, 16)]!r}")
                # A client reading the answer before asking again: the streams stay open
                # side by side without taking every sequence slot.
                await asyncio.sleep(rng.uniform(0.5, 2.0))

    def expect_error(self, kind, r, status, shape="openai", needle=None):
        try:
            body = r.json()
        except ValueError:
            return self.fail(f"{kind}: status {r.status_code}, not JSON: {r.text[:200]!r}")
        if r.status_code != status:
            return self.fail(f"{kind}: status {r.status_code}, want {status}: {r.text[:200]}")
        if shape == "openai":
            ok = set(body.get("error", {})) >= {"message", "type", "param", "code"}
        else:
            ok = body.get("type") == "error" and set(body.get("error", {})) >= {"type", "message"}
        if not ok:
            return self.fail(f"{kind}: not the {shape} error shape: {body}")
        if needle and needle not in json.dumps(body):
            return self.fail(f"{kind}: {needle!r} not in {body}")
        self.counts[kind] += 1

    async def abandoned_upload(self):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"model\": ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()
        self.counts["upload abandoned half-way"] += 1

    async def one(self, client, kind, rng):
        chat = f"{self.url}/v1/chat/completions"
        p = rng.choice(PROMPTS)
        if kind == "malformed JSON":
            self.expect_error(kind, await client.post(chat, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}), 400)
        elif kind == "wrong type":
            self.expect_error(kind, await client.post(chat, json={**chat_body(p, 4), "temperature": "hot"}), 400, needle="temperature")
        elif kind == "out of range":
            self.expect_error(kind, await client.post(chat, json={**chat_body(p, 4), "top_p": 7}), 400, needle="top_p")
        elif kind == "unknown model":
            self.expect_error(kind, await client.post(chat, json={**chat_body(p, 4), "model": "no-such-model"}), 404)
        elif kind == "prompt over the context":
            self.expect_error(kind, await client.post(chat, json=chat_body("word " * 9000, 4)), 400, needle="context")
        elif kind == "body over the limit":
            self.expect_error(kind, await client.post(chat, json=chat_body("x" * (MAX_BODY + 10), 4)), 413)
        elif kind == "invalid UTF-8":
            body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
            self.expect_error(kind, await client.post(chat, content=body, headers={"content-type": "application/json"}), 400)
        elif kind == "anthropic bad request":
            r = await client.post(f"{self.url}/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            self.expect_error(kind, r, 400, shape="anthropic", needle="max_tokens")
        elif kind == "upload abandoned half-way":
            await self.abandoned_upload()
        elif kind == "valid chat":
            r = await client.post(chat, json=chat_body(p, 8))
            got = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            if got == self.ref[("chat", p, 8)]:
                self.counts[kind] += 1
            else:
                self.fail(f"{kind} {p!r}: {got!r} vs {self.ref[('chat', p, 8)]!r}")
        elif kind == "valid anthropic":
            r = await client.post(f"{self.url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                                                 "messages": [{"role": "user", "content": p}]})
            got = r.json()["content"][0]["text"] if r.status_code == 200 else r.text
            if got == self.ref[("anthropic", p, 8)]:
                self.counts[kind] += 1
            else:
                self.fail(f"{kind} {p!r}: {got!r}")
        elif kind == "valid response":
            # The Responses API, streamed: the deltas make the chat reference's text.
            body = {"model": MODEL, "input": p, "max_output_tokens": 8, "temperature": 0, "stream": True}
            text, last = [], None
            async with client.stream("POST", f"{self.url}/v1/responses", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        last = event["type"]
                        if last == "response.output_text.delta":
                            text.append(event["delta"])
            got = "".join(text)
            if got == self.ref[("chat", p, 8)] and last in ("response.completed", "response.incomplete"):
                self.counts[kind] += 1
            else:
                self.fail(f"{kind} {p!r}: {got!r} ending {last}")
        elif kind == "responses stored state":
            r = await client.post(f"{self.url}/v1/responses", json={"model": MODEL, "input": p, "previous_response_id": "resp_1"})
            self.expect_error(kind, r, 400, needle="previous_response_id")
        elif kind == "stream dropped mid-way":
            await self.stream_text(client, chat_body(p, 16), drop_after=rng.randint(1, 12))
            self.counts[kind] += 1
        elif kind == "slow reader":
            got = await self.stream_text(client, chat_body(p, 16), slow=0.02)
            if got == self.ref[("chat", p, 16)]:
                self.counts[kind] += 1
            else:
                self.fail(f"{kind} {p!r}: {got!r}")
        elif kind == "n at its limit":
            r = await client.post(chat, json={**chat_body(p, 2), "n": 16, "temperature": 0.8, "seed": rng.randrange(1000)})
            if r.status_code == 200 and len(r.json()["choices"]) == 16:
                self.counts[kind] += 1
            else:
                self.fail(f"{kind}: {r.status_code} {r.text[:200]}")
        elif kind == "tokenize":
            r = await client.post(f"{self.url}/tokenize", json={"model": MODEL, "prompt": p})
            if r.status_code == 200 and r.json()["tokens"]:
                self.counts[kind] += 1
            else:
                self.fail(f"{kind}: {r.status_code} {r.text[:200]}")

    async def others(self, kinds):
        queue = asyncio.Queue()
        for k in kinds:
            queue.put_nowait(k)

        async def drain(index):
            rng = random.Random(1000 + index)
            async with httpx.AsyncClient(timeout=300) as client:
                while not queue.empty():
                    kind = queue.get_nowait()
                    try:
                        await self.one(client, kind, rng)
                    except (httpx.HTTPError, OSError) as e:
                        self.fail(f"{kind}: {e!r}")
        await asyncio.gather(*(drain(i) for i in range(CONCURRENCY)))


MIX = {
    "malformed JSON": 10, "wrong type": 8, "out of range": 8, "unknown model": 8, "prompt over the context": 3,
    "body over the limit": 2, "invalid UTF-8": 6, "anthropic bad request": 6, "upload abandoned half-way": 5,
    "valid chat": 10, "valid anthropic": 4, "valid response": 4, "responses stored state": 3, "stream dropped mid-way": 6, "slow reader": 2, "n at its limit": 2, "tokenize": 7,
}


def mixed(n, seed):
    rng = random.Random(seed)
    names, weights = zip(*MIX.items())
    return rng.choices(names, weights, k=n)


async def with_streamers(soak, kinds):
    """Runs `kinds` through the other clients while the streaming clients run; returns when
    both are done."""
    soak.stop_streamers.clear()
    streamers = [asyncio.create_task(soak.streamer(i)) for i in range(STREAMERS)]
    await soak.others(kinds)
    soak.stop_streamers.set()
    await asyncio.gather(*streamers)


def idle_rss(worker, router):
    """Both processes' memory once nothing is in flight, so that the sample after warm-up
    and the one at the end are taken in the same state (under load, the router's resident
    size swings by several MiB from one moment to the next). The daemons' allocator keeps
    freed pages for 5 s before its background thread returns them, so the samples wait past
    that; the smallest of three is taken. The worker's KV cache is allocated whole but
    becomes resident block by block as blocks are first written, which is growth by design,
    not a leak: the KiB it reports written are left out. Each daemon's live heap (bytes
    allocated and not freed, from its allocator) is the exact measure of a leak."""
    wait_until(lambda: metric(worker.metrics_url, "kiln_worker_kv_blocks_in_use") == 0
               and metric(router.url, "kiln_router_in_flight_requests") == 0, 30, "blocks and in-flight requests to return to 0")
    time.sleep(8)
    samples = []
    for _ in range(3):
        kv_kib = metric(worker.metrics_url, "kiln_worker_kv_written_bytes") / 1024
        samples.append({"worker": rss_kib(worker.proc.pid) - kv_kib, "router": rss_kib(router.proc.pid),
                        "router heap": metric(router.url, "kiln_router_heap_allocated_bytes") / 1024,
                        "worker heap": metric(worker.metrics_url, "kiln_worker_heap_allocated_bytes") / 1024})
        time.sleep(1)
    return {k: min(s[k] for s in samples) for k in samples[0]}


async def run(soak, worker, router):
    async with httpx.AsyncClient(timeout=300) as client:
        await soak.reference(client)
    # Warm-up: the same traffic, so allocators, buffers and caches reach their working size
    # (sampled every 15 s over a 25,000-request run at about 40 requests/s, both processes
    # settled within about 90 s, some 3,600 requests, and stayed level after it).
    await with_streamers(soak, mixed(WARM_UP_REQUESTS, 1))
    warm = idle_rss(worker, router)

    soak.counts.clear()
    started = time.monotonic()
    await with_streamers(soak, mixed(OTHER_REQUESTS, 2))
    return warm, time.monotonic() - started


def test_soak():
    worker = Worker("soak", "--max-seqs", "32")
    router = Router("soak", [worker.grpc], "--max-body-bytes", str(MAX_BODY), "--max-queue", "4096", "--client-timeout-secs", "10")
    try:
        soak = Soak(router)
        warm, elapsed = asyncio.run(run(soak, worker, router))
        assert worker.proc.poll() is None and router.proc.poll() is None, "a process exited during the soak"
        # Cancelled and finished sequences give back their blocks; the router forgets them.
        end = idle_rss(worker, router)
        counts = dict(sorted(soak.counts.items()))
        total = sum(v for k, v in counts.items() if k != "FAILED" and not k.startswith("streamed"))
        lines = [f"soak: {total} other requests in {elapsed:.1f} s ({total / elapsed:.0f}/s) beside {STREAMERS} streaming clients"]
        lines += [f"  {k}: {v}" for k, v in counts.items()]
        lines.append(f"  cancelled on the worker: {metric(worker.metrics_url, 'kiln_worker_cancelled_total'):.0f}, "
                     f"completed: {metric(worker.metrics_url, 'kiln_worker_completions_total'):.0f}")
        for name in ("worker heap", "router heap"):
            lines.append(f"  {name} allocated: {warm[name] / 1024:.1f} MiB after warm-up, {end[name] / 1024:.1f} MiB at the end "
                         f"({(end[name] / warm[name] - 1) * 100:+.1f}%)")
        for name in ("worker", "router"):
            lines.append(f"  {name} RSS{' less written KV cache' if name == 'worker' else ''}: {warm[name] / 1024:.1f} MiB after warm-up, {end[name] / 1024:.1f} MiB at the end "
                         f"({(end[name] / warm[name] - 1) * 100:+.1f}%)")
        print("\n" + "\n".join(lines))
        # make test prints this at its end (scripts/test-summary.sh).
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text("\n".join(lines) + "\n")
        assert not soak.failures, f"{counts.get('FAILED', 0)} failures, first ones:\n" + "\n".join(soak.failures)
        assert total == OTHER_REQUESTS, f"{total} of {OTHER_REQUESTS} requests accounted for"
        assert counts.get("streamed, equal to the reference", 0) >= STREAMERS, counts
        for name in ("worker", "router", "worker heap", "router heap"):
            assert end[name] <= warm[name] * 1.10, f"{name} memory grew from {warm[name]:.0f} KiB to {end[name]:.0f} KiB"
        assert worker.proc.poll() is None and router.proc.poll() is None
    finally:
        router.stop()
        worker.stop()
