#!/usr/bin/env bash
# What `make build-cuda` produced does what docs/gpu.md says on this machine:
# - target/cuda/release/kiln-worker computes on the CPU with --device cpu;
# - on a machine without the NVIDIA driver, --device cuda fails with one line naming what is
#   missing and exit status 1 (not a loader error or a crash); on a machine with a GPU it
#   hands over to kiln-worker-cuda, whose device shows in `kiln-worker eval`'s output;
# - kiln-worker-cuda holds candle's CUDA kernels for the architecture it was built for, and
#   kiln's own (cuda/kernels/attention.cu) as PTX that ptxas assembles for it, as the driver
#   will when it loads them.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/cuda/release
model=worker/tests/fixtures/hf/llama
for b in kiln-worker kiln-worker-cuda; do
    [ -x "$dir/$b" ] || { echo "cuda-build-check: $dir/$b is missing (run make build-cuda)" >&2; exit 1; }
done

out="$("$dir/kiln-worker" run -m "$model" -i "The quick brown fox" -n 4 --raw --device cpu 2>/dev/null)"
[ -n "$out" ] || { echo "cuda-build-check: --device cpu produced nothing" >&2; exit 1; }
echo "cuda-build-check: --device cpu: ok"

if "$dir/kiln-worker" run -m "$model" -i "hi" -n 2 --device cuda >/tmp/kiln-cuda-check.out 2>/tmp/kiln-cuda-check.err; then
    echo "cuda-build-check: --device cuda ran: this machine has a GPU"
else
    status=$?
    msg="$(cat /tmp/kiln-cuda-check.err)"
    if [ "$status" != 1 ] || [ "$(printf '%s\n' "$msg" | wc -l)" != 1 ] || ! printf '%s' "$msg" | grep -q -- "--device cuda:0: "; then
        echo "cuda-build-check: --device cuda without a GPU should fail with one line and status 1; got status $status:" >&2
        printf '%s\n' "$msg" >&2
        exit 1
    fi
    echo "cuda-build-check: --device cuda without a GPU: $msg"
fi

# The hand-over and the CUDA build's own start, with the driver stand-in made at build time
# in place of a driver: kiln-worker-cuda starts, finds no GPU and says so in one line.
home="$(scripts/cuda-toolkit.sh)"
fake="$(mktemp -d)"
ln -s "$home/lib/stubs/libcuda.so" "$fake/libcuda.so.1"
set +e
msg="$(LD_LIBRARY_PATH="$fake:$home/lib" "$dir/kiln-worker" run -m "$model" -i "hi" -n 2 --device cuda 2>&1 >/dev/null)"
status=$?
set -e
rm -rf "$fake"
if [ "$status" != 1 ] || ! printf '%s' "$msg" | grep -q "the NVIDIA driver reports no usable GPU"; then
    echo "cuda-build-check: kiln-worker-cuda on a driver without devices should fail with one line and status 1; got status $status:" >&2
    printf '%s\n' "$msg" >&2
    exit 1
fi
echo "cuda-build-check: handed over to kiln-worker-cuda, which found no device: $msg"

# The CUDA kernels are in the binary, compiled for the GPUs asked for.
arch="sm_${CUDA_COMPUTE_CAP:-90}"
if ! grep -a -q "$arch" "$dir/kiln-worker-cuda"; then
    echo "cuda-build-check: kiln-worker-cuda holds no $arch code" >&2
    exit 1
fi
echo "cuda-build-check: kiln-worker-cuda ($(du -h "$dir/kiln-worker-cuda" | cut -f1)) holds $arch kernels"

# kiln's kernels: every entry point in the binary, and their PTX assembling for the GPU.
for kernel in kiln_paged_attention_f16 kiln_paged_attention_f32 kiln_write_cache_f16 kiln_write_cache_f32; do
    grep -a -q "$kernel" "$dir/kiln-worker-cuda" || { echo "cuda-build-check: kiln-worker-cuda lacks the kernel $kernel" >&2; exit 1; }
done
ptx="$(ls -t target/release/build/kiln-cuda-kernels-*/out/attention.ptx | head -1)"
toolkit="$(scripts/cuda-toolkit.sh)"
"$toolkit/bin/ptxas" -arch="$arch" -o /dev/null "$ptx" || { echo "cuda-build-check: kiln's kernels do not assemble for $arch" >&2; exit 1; }
echo "cuda-build-check: kiln's attention kernels assemble for $arch"
