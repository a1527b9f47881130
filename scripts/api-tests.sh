#!/usr/bin/env bash
# Runs the HTTP API tests (tests/api) with the official openai and anthropic clients against
# a worker and routers started from target/release, the chat-template corpus against
# transformers (tests/templates), and the soak of hostile and valid traffic (tests/soak). The
# clients live in .venv, made (or refreshed when tests/api/requirements.txt changes) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
REQ=tests/api/requirements.txt
STAMP=$VENV/.requirements
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$STAMP"; then
    echo "api-tests: installing the API clients into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
    cp "$REQ" "$STAMP"
fi
# `--venv-only`: just make the environment (other suites run their own pytest from it).
[ "${1:-}" = "--venv-only" ] && exit 0
# KILN_PYTEST_PATHS picks suites (make test-full runs a longer soak with it).
exec "$VENV/bin/python" -m pytest ${KILN_PYTEST_PATHS:-tests/api tests/templates tests/helm tests/soak} -q "$@"
