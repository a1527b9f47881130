#!/usr/bin/env bash
# Prefix-aware routing versus round robin and least-loaded on a shared-system-prompt
# workload: WORKERS workers (one thread each, a KV cache of KV_MB MiB), many users of
# PROMPTS applications, each request opening with its application's ~300-token system
# prompt. For each policy the workers start fresh (empty caches), a router with that policy
# takes REQUESTS streaming chats (CONCURRENCY at once), and the workers' prefix-cache
# counters give the cluster's hit rate. Prints one line per policy and appends JSON to
# loadtests/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
WORKERS=${WORKERS:-3}
PROMPTS=${PROMPTS:-24}
REQUESTS=${REQUESTS:-144}
CONCURRENCY=${CONCURRENCY:-6}
MAX_TOKENS=${MAX_TOKENS:-16}
KV_MB=${KV_MB:-128}
POLICIES=${POLICIES:-"round-robin least-loaded prefix"}
BASE=${BASE:-52100}
OUT=loadtests/results.jsonl

[ -x $BIN/kiln-router ] || make build
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

counter() { # sum of a worker metric over all workers
    local name=$1 total=0 v
    for i in $(seq 1 "$WORKERS"); do
        v=$(curl -sf "http://127.0.0.1:$((BASE + 50 + i))/metrics" | awk -v n="$name" '$1 ~ "^"n"[{ ]" {s += $2} END {print s + 0}')
        total=$(echo "$total + $v" | bc -l)
    done
    echo "$total"
}

for policy in $POLICIES; do
    pids=()
    addrs=()
    for i in $(seq 1 "$WORKERS"); do
        $BIN/kiln-worker serve -m smollm2 -t 1 --kv-cache-mb "$KV_MB" --grpc "127.0.0.1:$((BASE + i))" \
            --metrics "127.0.0.1:$((BASE + 50 + i))" >/dev/null 2>&1 &
        pids+=($!)
        addrs+=("127.0.0.1:$((BASE + i))")
    done
    $BIN/kiln-router --workers "$(IFS=,; echo "${addrs[*]}")" --port $((BASE + 99)) --policy "$policy" >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$((BASE + 99))/health" >/dev/null && break; sleep 0.2; done
    sleep 1.5 # every worker up
    report=$($BIN/kilnctl --router "http://127.0.0.1:$((BASE + 99))" load -c "$CONCURRENCY" -n "$REQUESTS" \
        --max-tokens "$MAX_TOKENS" --shared-system-prompts "$PROMPTS" --json)
    query=$(counter kiln_worker_prefix_cache_query_tokens_total)
    hit=$(counter kiln_worker_prefix_cache_hit_tokens_total)
    rate=$(echo "scale=4; $hit / $query" | bc -l)
    line=$(echo "$report" | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(policy='$policy', workers=$WORKERS, prompts=$PROMPTS, kv_mb=$KV_MB, prefix_hit_rate=$rate); print(json.dumps(r))")
    echo "$line" >> "$OUT"
    echo "$line" | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"{r['policy']:>12}: prefix-cache hit rate {r['prefix_hit_rate']*100:5.1f}%  TTFT p50 {r['ttft_ms_p50']:6.0f} ms  p99 {r['ttft_ms_p99']:6.0f} ms  {r['generated_tokens_per_s']:6.1f} tokens/s  wall {r['wall_s']:.1f} s  errors {r['errors']}\")"
    cleanup
done
