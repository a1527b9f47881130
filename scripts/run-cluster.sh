#!/usr/bin/env bash
# A one-node kiln cluster: a worker serving $MODEL and a router on $HOST:$PORT, no etcd.
# Ctrl-C (or SIGTERM) drains and stops both.
set -euo pipefail

MODEL=${MODEL:-smollm2}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}
GRPC=${GRPC:-127.0.0.1:50051}
WORKER_METRICS=${WORKER_METRICS:-127.0.0.1:9091}
BIN=${BIN:-target/release}

pids=()
stop() {
    trap - INT TERM
    echo >&2
    echo "kiln: stopping" >&2
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    exit 0
}
trap stop INT TERM

alive() { kill -0 "$1" 2>/dev/null; }

# Stops everything if a process has exited, saying so unless it stopped on Ctrl-C: a Ctrl-C
# in a terminal reaches the worker and router too, and they stop cleanly (0) or by the
# signal (130), sometimes before this script's own trap runs.
check_children() {
    for pid in "${pids[@]}"; do
        if ! alive "$pid"; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            if [ "$status" -ne 0 ] && [ "$status" -ne 130 ]; then
                echo "kiln: a process exited $1 (status $status; see the messages above)" >&2
            fi
            stop
        fi
    done
}

"$BIN/kiln-worker" serve -m "$MODEL" --grpc "$GRPC" --metrics "$WORKER_METRICS" &
pids+=($!)
"$BIN/kiln-router" --workers "$GRPC" --host "$HOST" --port "$PORT" &
pids+=($!)

# The worker may first download the model; wait until the router sees it serving.
until "$BIN/kilnctl" --router "http://$HOST:$PORT" status >/dev/null 2>&1; do
    check_children "during start-up"
    sleep 0.5
done

model_id=$("$BIN/kilnctl" --router "http://$HOST:$PORT" models | cut -f1 | head -n1)
cat >&2 <<MSG

kiln is serving \`$model_id\` at http://$HOST:$PORT (OpenAI and Anthropic APIs; metrics at /metrics)

  curl http://$HOST:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "$model_id", "messages": [{"role": "user", "content": "Hello!"}]}'

  $BIN/kilnctl chat          # interactive chat in another terminal

Press Ctrl-C to stop.
MSG

while true; do
    check_children unexpectedly
    sleep 1
done
