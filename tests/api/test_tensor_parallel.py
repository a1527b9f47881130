"""A tensor-parallel group placed through etcd, with real processes: two placeable workers
become one group (`kilnctl place --tensor-parallel 2`), serve the official openai client
through a router with the bits one worker gives, and when a follower rank is killed mid-stream
the group is unloaded at once, the streams finish on a whole-model worker with the fault-free
text, and the surviving rank returns to the pool with its memory given back."""
import json
import signal
import time

import httpx2 as httpx

from conftest import Etcd, Router, Worker, free_port, wait_until
from test_faults import QUESTIONS, ROUTER_ARGS, Streams, client, kilnctl, messages, metric, router_sees

TOKENS = 120
MODEL = "tp-chat"


def records(etcd):
    out = kilnctl(etcd.url, "--json", "workers")
    assert out.returncode == 0, out.stderr
    return {w["id"]: w for w in json.loads(out.stdout)}


def rss_mib(worker):
    for line in open(f"/proc/{worker.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def placeable(name, etcd):
    return Worker(name, "-t", "1", "--max-seqs", "16", "--tp-listen", f"127.0.0.1:{free_port()}", "--tp-timeout-secs", "20",
                  etcd=etcd.url, model=None)


def answers(router, questions):
    c = client(router)
    return [c.chat.completions.create(model=MODEL, messages=messages(q), max_tokens=TOKENS, temperature=0).choices[0].message.content
            for q in questions]


def test_a_placed_group_serves_then_survives_a_dead_rank(tmp_path):
    etcd = Etcd("tp", tmp_path / "etcd")
    etcd.wait_ready()
    members = [placeable("g0", etcd), placeable("g1", etcd)]
    router = Router("tp", [], *ROUTER_ARGS, etcd=etcd.url, wait=False)
    whole = None
    try:
        idle_rss = {w.name: rss_mib(w) for w in members}
        out = kilnctl(etcd.url, "place", MODEL, "--source", "smollm2", "--replicas", "1", "--tensor-parallel", "2", "--workers", "g0,g1")
        assert out.returncode == 0 and "2 workers each" in out.stdout, out.stdout + out.stderr
        wait_until(lambda: MODEL in httpx.get(f"{router.url}/health").text, 120, "the group to serve the model")

        # One group, ranked; only rank 0 serves (and is what the router lists).
        recs = records(etcd)
        ranks = {name: recs[name]["group"]["rank"] for name in ("g0", "g1")}
        assert sorted(ranks.values()) == [0, 1], recs
        assert recs["g0"]["group"]["id"] == recs["g1"]["group"]["id"] and recs["g0"]["group"]["members"] == recs["g1"]["group"]["members"]
        leader = next(w for w in members if ranks[w.name] == 0)
        follower = next(w for w in members if ranks[w.name] == 1)
        table = kilnctl(etcd.url, "workers").stdout
        assert "rank 0/2" in table and "rank 1/2" in table, table
        placed = next(m for m in json.loads(kilnctl(etcd.url, "--json", "models").stdout) if m["model"] == MODEL)
        assert placed["ready"] == 1 and placed["tensor_parallel"] == 2, placed
        loaded_rss = {w.name: rss_mib(w) for w in members}

        # The group's answers, then a whole-model worker under the same name: the same text.
        reference = answers(router, QUESTIONS[:4])
        assert all(reference), reference
        whole = Worker("whole", "-t", "1", "--max-seqs", "16", "--model-id", MODEL, etcd=etcd.url)
        wait_until(lambda: router_sees(router, whole), 30, "the router to see the whole-model worker")
        assert answers(router, QUESTIONS[:4]) == reference, "the group and one worker give the same greedy text"

        # Streams over both; kill -9 the follower once the group is generating.
        resumed_before = metric(router, "kiln_router_resumed_total")
        s = Streams(router, QUESTIONS[:4] * 2, max_tokens=TOKENS, model=MODEL)
        wait_until(lambda: leader.metric("kiln_worker_running_sequences") > 0 and s.chunks() >= 8, 60, "streams under way on the group")
        killed_at = time.monotonic()
        follower.stop(signal.SIGKILL)
        wait_until(lambda: records(etcd)[leader.name].get("model") is None, 10, "rank 0 to unload")
        unloaded_after = time.monotonic() - killed_at
        s.join()
        assert not s.errors, s.errors
        assert s.texts == reference * 2, "every stream completes with the fault-free text"
        resumed = metric(router, "kiln_router_resumed_total") - resumed_before
        assert resumed >= 1
        assert "tensor-parallel group" in leader.log_text() and "failed" in leader.log_text()
        # Rank 0 is alive, answers health checks, and has given its share's memory back.
        assert httpx.get(f"{leader.metrics_url}/health").status_code == 200
        wait_until(lambda: rss_mib(leader) < idle_rss[leader.name] + 0.5 * (loaded_rss[leader.name] - idle_rss[leader.name]) + 32, 20,
                   "rank 0 to free its share")
        print(f"\n[tp] kill -9 of rank 1 mid-stream: rank 0 unloaded {unloaded_after:.2f} s later (lease TTL 3 s), {int(resumed)} "
              f"stream(s) resumed on the whole-model worker; rank 0 RSS idle {idle_rss[leader.name]:.0f} MiB, "
              f"loaded {loaded_rss[leader.name]:.0f} MiB, after {rss_mib(leader):.0f} MiB")
    finally:
        if whole:
            whole.stop()
        router.stop()
        for w in members:
            w.stop(signal.SIGKILL)
        etcd.stop()
