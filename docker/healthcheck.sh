#!/bin/bash
# Container health check without curl: `kiln-healthcheck PORT [PATH] [TEXT]` sends
# GET PATH (default /health) to localhost:PORT over bash's /dev/tcp; healthy when the answer's
# status is 200 and, if TEXT is given, its body contains TEXT.
set -eu
exec 3<>"/dev/tcp/127.0.0.1/${1:?port}"
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "${2:-/health}" >&3
read -r -t 3 _ status _ <&3
[ "$status" = 200 ] || exit 1
[ -z "${3:-}" ] || grep -qF -- "$3" <&3
