#!/usr/bin/env bash
# Concurrent streaming chat load: kiln through its router, kiln straight over gRPC (to show
# what the router adds), and llama-server on the same model and requests when LLAMA_SERVER
# points at its binary. Every request generates MAX_TOKENS tokens (end-of-sequence ignored),
# greedy, with a prompt unique to the run.
#
#   loadtests/chat.sh                      # kiln only
#   LLAMA_SERVER=/path/to/llama-server loadtests/chat.sh
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-smollm2}
CONCURRENCY=${CONCURRENCY:-"16 64"}
MAX_TOKENS=${MAX_TOKENS:-96}
MAX_SEQS=${MAX_SEQS:-16}
THREADS=${THREADS:-2}
BIN=target/release
OUT=${OUT:-loadtests/results.jsonl}

cargo build --release --workspace --bins >&2
model_path=$("$BIN/kiln-worker" pull "$MODEL")

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ready() { # url
    for _ in $(seq 600); do
        "$BIN/kilnctl" --router "$1" status >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "loadtest: $1 never became ready" >&2
    exit 1
}

: > "$OUT"
record() { # label, json
    [ -n "$2" ] || { echo "loadtest: no result for $1" >&2; exit 1; }
    echo "{\"system\": \"$1\", $(echo "$2" | sed 's/^{//')" >> "$OUT"
}

"$BIN/kiln-worker" serve -m "$model_path" --model-id "$MODEL" -t "$THREADS" --max-seqs "$MAX_SEQS" --grpc 127.0.0.1:50151 2>/dev/null &
pids+=($!)
"$BIN/kiln-router" --workers 127.0.0.1:50151 --port 8180 2>/dev/null &
pids+=($!)
wait_ready http://127.0.0.1:8180
for c in $CONCURRENCY; do
    record "kiln (router)" "$("$BIN/kilnctl" --router http://127.0.0.1:8180 load -c "$c" --max-tokens "$MAX_TOKENS" --json)"
    record "kiln (gRPC)" "$("$BIN/kilnctl" load -c "$c" --max-tokens "$MAX_TOKENS" --grpc 127.0.0.1:50151 --json)"
done
cleanup
pids=()

if [ -n "${LLAMA_SERVER:-}" ]; then
    # 16 slots of 512 tokens each, like the kiln worker's 16 sequences.
    "$LLAMA_SERVER" -m "$model_path" -np 16 -t "$THREADS" -c 8192 --host 127.0.0.1 --port 8181 >/dev/null 2>&1 &
    pids+=($!)
    wait_ready http://127.0.0.1:8181
    for c in $CONCURRENCY; do
        record "llama-server -np 16" "$("$BIN/kilnctl" --router http://127.0.0.1:8181 load -c "$c" --max-tokens "$MAX_TOKENS" --json)"
    done
fi

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'system':<22}{'conc':>5}{'errors':>7}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
for r in rows:
    print(f"{r['system']:<22}{r['concurrency']:>5}{r['errors']:>7}{r['generated_tokens_per_s']:>10.1f}"
          f"{r['ttft_ms_p50']:>8.0f}ms{r['ttft_ms_p99']:>8.0f}ms{r['inter_token_ms_p50']:>7.1f}ms{r['inter_token_ms_p99']:>7.1f}ms")
PY
