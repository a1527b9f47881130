#!/usr/bin/env bash
# `compose.sh up`: starts the Compose cluster (deploy/compose.yaml) from the images `make
# images` built, waits until the load balancer serves a chat completion, prints an example,
# and prints the load balancer's base URL as its last line.
# `compose.sh down`: removes the cluster's containers, networks and volumes.
# Uses Compose v2 (`docker compose`) when installed, else docker-compose v1; KILN_COMPOSE
# names another. KILN_PROJECT names the Compose project (default kiln).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${KILN_PROJECT:-kiln}
PORT=${KILN_PORT:-8080}
MODEL=${KILN_MODEL:-smollm2}
if [ -n "${KILN_COMPOSE:-}" ]; then
    read -r -a compose <<<"$KILN_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
fi
compose+=(-f deploy/compose.yaml -p "$PROJECT")
# KILN_PROFILES=observability adds Grafana.
for profile in ${KILN_PROFILES:-}; do
    compose+=(--profile "$profile")
done

case "${1:-}" in
up)
    "${compose[@]}" up -d >&2
    url="http://127.0.0.1:$PORT"
    echo "compose: waiting for the cluster to serve $MODEL (the first start fetches the model)" >&2
    body="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hi.\"}],\"max_tokens\":8}"
    auth=()
    [ -n "${KILN_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $KILN_API_KEY")
    deadline=$((SECONDS + ${KILN_COMPOSE_TIMEOUT:-600}))
    until curl -sf -m 30 "${auth[@]}" -H 'Content-Type: application/json' -d "$body" "$url/v1/chat/completions" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "compose: the cluster did not serve within ${KILN_COMPOSE_TIMEOUT:-600} s; its state:" >&2
            "${compose[@]}" ps >&2
            "${compose[@]}" logs --tail 20 >&2
            exit 1
        fi
        sleep 2
    done
    cat >&2 <<MSG
compose: the cluster serves $MODEL through the load balancer. Try:
  curl $url/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "Hello!"}]}'
Prometheus: http://127.0.0.1:${KILN_PROMETHEUS_PORT:-9090}; stop the cluster with make compose-down.
MSG
    echo "$url/v1"
    ;;
down)
    "${compose[@]}" down --volumes --remove-orphans >&2
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
