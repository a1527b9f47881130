#!/usr/bin/env bash
# System tools the build and the tests need, from Debian's packages: protoc (the etcd client
# compiles etcd's protocol at build time), etcd (the cluster tests start real servers) and
# Prometheus (promtool checks the alert rules and the daemons' metrics).
# Installs what is missing when it can (root, or sudo without a password); otherwise says
# what to install.
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ "${1:-}" = "--with-etcd" ]; then
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    # promtool checks the alert rules and the daemons' metrics.
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=""; fi
    fi
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
        echo "deps: installing ${missing[*]}" >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
        exit 0
    fi
fi
echo "deps: please install ${missing[*]} (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
exit 1
