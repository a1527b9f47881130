#!/usr/bin/env bash
# Builds kiln's container images from the host's release binaries (no Rust toolchain runs in
# a container): kiln-router (with kilnctl), kiln-worker (CPU), and the cluster's helpers
# kiln-lb (HAProxy), kiln-etcd and kiln-prometheus from Debian's packages. The base,
# debian:bookworm-slim, is made locally when no registry has it (docker/base.sh).
# `--cuda` also builds kiln-worker-cuda on $KILN_CUDA_BASE (a CUDA runtime image).
# Prints each image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${KILN_TAG:-dev}
BASE=${KILN_BASE_IMAGE:-debian:bookworm-slim}
CONTEXT=target/docker
cuda=0
[ "${1:-}" = "--cuda" ] && cuda=1

command -v docker >/dev/null 2>&1 || { echo "images: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "images: the Docker engine is not reachable (docker info failed)" >&2; exit 1; }

KILN_BASE_IMAGE=$BASE docker/base.sh
# The same build as `make build` (building single packages would unify features differently
# and rebuild the workspace).
cargo build --release --workspace --bins

rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
for bin in kiln-router kilnctl kiln-worker; do
    # Line tables stay in the host's binaries for backtraces; images ship stripped ones.
    strip -o "$CONTEXT/$bin" "target/release/$bin"
done
cp docker/healthcheck.sh deploy/haproxy.cfg "$CONTEXT/"
chmod 0755 "$CONTEXT"/kiln-router "$CONTEXT"/kilnctl "$CONTEXT"/kiln-worker "$CONTEXT"/healthcheck.sh

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
build() {
    local name=$1 file=$2
    shift 2
    echo "images: building $name:$TAG" >&2
    # The engine's notice that its classic builder is deprecated is left out.
    docker build --quiet -f "docker/$file" -t "$name:$TAG" \
        --build-arg "BASE=$BASE" --build-arg "VERSION=$version" --build-arg "REVISION=$revision" "$@" "$CONTEXT" \
        2> >(grep -v -e 'DEPRECATED: The legacy builder' -e 'Install the buildx component' -e 'docs.docker.com/go/buildx' -e '^$' >&2) >/dev/null
}
build kiln-router Dockerfile.router
build kiln-worker Dockerfile.worker
build kiln-lb Dockerfile.lb
build kiln-etcd Dockerfile.etcd
build kiln-prometheus Dockerfile.prometheus
images=(kiln-router kiln-worker kiln-lb kiln-etcd kiln-prometheus)
if [ $cuda = 1 ]; then
    : "${KILN_CUDA_BASE:?set KILN_CUDA_BASE to a CUDA runtime image, e.g. nvidia/cuda:12.8.1-runtime-ubuntu22.04}"
    # The GPU backend is not built yet: the image would hold the CPU worker, so refuse.
    if ! target/release/kiln-worker --help 2>/dev/null | grep -q -- "--device"; then
        echo "images: this kiln-worker was built without the GPU backend; kiln-worker-cuda not built" >&2
        exit 1
    fi
    build kiln-worker-cuda Dockerfile.worker-cuda --build-arg "BASE=$KILN_CUDA_BASE"
    images+=(kiln-worker-cuda)
fi

printf '%-24s %10s\n' IMAGE SIZE
for i in "$BASE" "${images[@]/%/:$TAG}"; do
    printf '%-24s %7.0f MB\n' "$i" "$(docker image inspect --format '{{.Size}}' "$i" | awk '{print $1/1e6}')"
done
