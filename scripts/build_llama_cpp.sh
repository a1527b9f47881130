#!/usr/bin/env bash
# Builds llama.cpp's benchmark tools for one x86 instruction set, so that kiln is compared
# with it ISA for ISA: `scripts/build_llama_cpp.sh avx2|avx512 [DIR]` prints the directory
# holding llama-bench and llama-batched-bench.
#
# The tree is the one vendored by the llama-cpp-python sdist on PyPI (the reference the
# goldens were made with). `avx2` turns on AVX, AVX2, FMA, F16C and BMI2 only (an AVX2-only
# CPU such as AMD Zen 2/3 or Intel Haswell to Alder Lake without AVX-VNNI); `avx512` adds
# AVX-512 F/BW/VL/DQ, VNNI, VBMI and BF16 and leaves AMX off: this tree's AMX kernels died
# with SIGILL (a `tileloadd` in `tinygemm_kernel_amx`, on SmolLM2 and Gemma 3 alike) on a
# Xeon VM whose AMX instructions run in a small C program, so there is no AMX figure to
# compare with. GGML_NATIVE is off in both, so the build does not pick up whatever the
# build machine has.
set -euo pipefail
ISA=${1:?usage: build_llama_cpp.sh avx2|avx512 [DIR]}
ROOT=${2:-${TMPDIR:-/tmp}/kiln-llama-cpp}
VERSION=0.3.36
case "$ISA" in
  avx2) FLAGS=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF
               -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF) ;;
  avx512) FLAGS=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                 -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON
                 -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF) ;;
  *) echo "build_llama_cpp.sh: unknown instruction set '$ISA' (avx2 or avx512)" >&2; exit 2 ;;
esac
SRC=$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$ROOT/build-$ISA
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-batched-bench" ]; then
  mkdir -p "$ROOT"
  if [ ! -d "$SRC" ]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$ROOT" >&2
    tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
  fi
  CMAKE=$(command -v cmake || true)
  if [ -z "$CMAKE" ]; then
    python3 -m venv "$ROOT/venv" >&2 && "$ROOT/venv/bin/pip" install --quiet cmake >&2
    CMAKE=$ROOT/venv/bin/cmake
  fi
  "$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF "${FLAGS[@]}" >&2
  "$CMAKE" --build "$BUILD" -j"$(nproc)" --target llama-bench llama-batched-bench llama-quantize >&2
fi
echo "$BUILD/bin"
