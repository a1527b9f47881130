#!/usr/bin/env bash
# `make build-cuda`: the worker with the CUDA backend, into target/cuda/release/:
#   kiln-worker-cuda  the CUDA build (candle's CUDA device; needs the NVIDIA driver and the
#                     CUDA 13 cuBLAS/cuRAND/NVRTC libraries at load time)
#   kiln-worker       the CPU build, which runs everything on a machine without a GPU and
#                     hands `--device cuda[:N]` over to kiln-worker-cuda once it has checked
#                     that the driver and the libraries are there
# No GPU or system toolkit is needed to build: scripts/cuda-toolkit.sh installs the CUDA 13
# wheels from PyPI when there is no toolkit. CUDA_COMPUTE_CAP picks the GPU architecture the
# kernels are compiled for (default 90: H100/H200; 80 for A100, 89 for L4/L40, 120 for
# Blackwell workstation cards).
set -euo pipefail
cd "$(dirname "$0")/.."

home="$(scripts/cuda-toolkit.sh)"
cap="${CUDA_COMPUTE_CAP:-90}"
mkdir -p target/cuda/release
# The CUDA build shares target/ with the CPU build. Resolved as `make build` resolves (the
# whole workspace, so every dependency gets the same features, the `cuda` feature added) but
# building only the worker binary, it compiles again only what the feature reaches: candle,
# cudarc, kiln's kernels, the worker, and the few workspace crates (kiln-proto and two that
# use it) whose build dependencies candle's change. Its worker binary is moved out of
# target/release at once, and the CPU build after it puts the CPU worker back (cargo only
# copies the up-to-date binary again).
(
    export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
    # Linking looks in the toolkit (and at the driver stub when the machine has no driver).
    export LIBRARY_PATH="$home/lib:$home/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    cargo build --release --workspace --bin kiln-worker --features kiln-worker/cuda
    mv -f target/release/kiln-worker target/cuda/release/kiln-worker-cuda
)
# Outside the toolkit's environment, so that nothing the CPU build depends on sees a change.
cargo build --release --workspace --bins
cp -f target/release/kiln-worker target/cuda/release/kiln-worker
echo "build-cuda: target/cuda/release/kiln-worker (run this) and target/cuda/release/kiln-worker-cuda (sm_${cap})" >&2
