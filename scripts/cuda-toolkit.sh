#!/usr/bin/env bash
# Prints the CUDA toolkit directory `make build-cuda` compiles with, installing one first when
# the machine has none: the CUDA 13.0 wheels from PyPI (nvcc, its headers and the libraries the
# worker links), unpacked into a directory laid out like a toolkit. About 830 MB of downloads,
# once.
#
# A system toolkit wins when there is one: $CUDA_HOME, or nvcc on the PATH.
#
# No GPU driver is needed to build: linking needs a libcuda, and a machine without the driver
# gets a stub made here from cuda.h (every function returns CUDA_ERROR_NO_DEVICE). The stub is
# only linked against; it is never installed or loaded.
set -euo pipefail

if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "$CUDA_HOME"
    exit 0
fi
if command -v nvcc >/dev/null 2>&1; then
    dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"
    exit 0
fi

dir="${KILN_CUDA_TOOLKIT:-$HOME/.cache/kiln/cuda-13.0}"
home="$dir/nvidia/cu13"
if [ ! -x "$home/bin/nvcc" ]; then
    echo "cuda-toolkit: installing the CUDA 13.0 toolkit wheels into $dir (about 830 MB, once)" >&2
    # pip from a virtual environment of its own: a system Python may refuse installs (PEP 668).
    [ -x "$dir/.pip/bin/pip" ] || python3 -m venv "$dir/.pip" >&2
    "$dir/.pip/bin/pip" install --quiet --no-deps --disable-pip-version-check --target "$dir" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
        nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 >&2
    [ -x "$home/bin/nvcc" ] || { echo "cuda-toolkit: the wheels did not provide $home/bin/nvcc" >&2; exit 1; }
fi
[ -e "$home/lib64" ] || ln -s lib "$home/lib64"
# The wheels ship only versioned libraries (libcublas.so.13); the linker asks for libcublas.so.
for lib in "$home"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done
if [ ! -e "$home/lib/stubs/libcuda.so" ]; then
    mkdir -p "$home/lib/stubs"
    python3 "$(dirname "$0")/cuda_stub.py" "$home/include/cuda.h" "$home/lib/stubs/libcuda.c"
    cc -shared -fPIC -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda.c" -Wl,-soname,libcuda.so.1
fi
echo "$home"
