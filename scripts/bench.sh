#!/usr/bin/env bash
# Prefill (pp512) and decode (tg128) speed of kiln on both known models, and of llama.cpp's
# llama-bench on the same files when `llama-bench` is on PATH (or LLAMA_BENCH points at it),
# with the ratios kiln/llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=./target/release/kiln-worker
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
LLAMA_BENCH=${LLAMA_BENCH:-$(command -v llama-bench || true)}

printf '| model | test | kiln t/s | llama.cpp t/s | ratio |\n|---|---|---:|---:|---:|\n'
for model in smollm2 gemma3; do
  path=$($KILN pull "$model" 2>/dev/null)
  kiln_json=$($KILN bench -m "$path" -p 512 -n 128 -r "$REPS" -t "$THREADS" --json 2>/dev/null)
  llama_json='[]'
  if [ -n "$LLAMA_BENCH" ]; then
    llama_json=$("$LLAMA_BENCH" -m "$path" -p 512 -n 128 -r "$REPS" -t "$THREADS" -o json 2>/dev/null)
  fi
  python3 - "$model" "$kiln_json" "$llama_json" <<'PY'
import json, sys
model, kiln, llama = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def find(rows, p, g):
    for r in rows:
        if r["n_prompt"] == p and r["n_gen"] == g:
            return r
for p, g, name in [(512, 0, "pp512"), (0, 128, "tg128")]:
    k, l = find(kiln, p, g), find(llama, p, g)
    kt = f'{k["avg_ts"]:.1f} ± {k["stddev_ts"]:.1f}'
    lt = f'{l["avg_ts"]:.1f} ± {l["stddev_ts"]:.1f}' if l else "-"
    ratio = f'{k["avg_ts"] / l["avg_ts"]:.2f}x' if l else "-"
    print(f"| {model} | {name} | {kt} | {lt} | {ratio} |")
PY
done
