#!/usr/bin/env bash
# Speed of kiln next to llama.cpp on the same files, as ratios kiln/llama.cpp:
#  - prefill (pp512) and decode (tg128) of both known models, against `llama-bench`;
#  - aggregate decode with 1, 4 and 16 parallel sequences on SmolLM2 (128 prompt and 128
#    generated tokens each), against `llama-batched-bench`.
# The llama.cpp tools are used when on PATH (or given by LLAMA_BENCH / LLAMA_BATCHED_BENCH).
#
# ROUNDS=N (default 1) runs the whole comparison N times, kiln and llama.cpp back to back in
# each round, and reports per row the median of each side and the median of the rounds'
# ratios: on a machine shared with others (a cloud VM whose neighbours take memory bandwidth
# and execution units for minutes at a time) one round can be off by half in either direction.
#
# ISA=avx2 or ISA=avx512 compares ISA for ISA: llama.cpp is built for that instruction set
# (scripts/build_llama_cpp.sh, about 10 minutes on 2 cores the first time) and kiln is held to
# it with KILN_ISA, so an AVX-512 machine can measure the AVX2 paths of both.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-./target/release/kiln-worker}  # another build for A/B comparisons
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-1}
ISA=${ISA:-}
case "$ISA" in
  '') ;;
  avx2) export KILN_ISA=avx2 ;;
  avx512) export KILN_ISA=avx512-vnni ;;
  *) echo "bench.sh: ISA must be avx2 or avx512, not '$ISA'" >&2; exit 2 ;;
esac
if [ -n "$ISA" ]; then
  grep -q "${ISA}" /proc/cpuinfo || { echo "bench.sh: this CPU has no $ISA" >&2; exit 2; }
  LLAMA_BIN=$(scripts/build_llama_cpp.sh "$ISA")
  LLAMA_BENCH=${LLAMA_BENCH:-$LLAMA_BIN/llama-bench}
  LLAMA_BATCHED_BENCH=${LLAMA_BATCHED_BENCH:-$LLAMA_BIN/llama-batched-bench}
  echo "kiln with KILN_ISA=$KILN_ISA; llama.cpp from $LLAMA_BIN"
  echo
fi
LLAMA_BENCH=${LLAMA_BENCH:-$(command -v llama-bench || true)}
LLAMA_BATCHED_BENCH=${LLAMA_BATCHED_BENCH:-$(command -v llama-batched-bench || true)}

ROWS=$(mktemp)
trap 'rm -f "$ROWS"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for model in smollm2 gemma3; do
    path=$($KILN pull "$model" 2>/dev/null)
    kiln_json=$($KILN bench -m "$path" -p 512 -n 128 -r "$REPS" -t "$THREADS" --json 2>/dev/null)
    llama_json='[]'
    if [ -n "$LLAMA_BENCH" ]; then
      llama_json=$("$LLAMA_BENCH" -m "$path" -p 512 -n 128 -r "$REPS" -t "$THREADS" -o json 2>/dev/null)
    fi
    python3 - "$model" "$kiln_json" "$llama_json" >>"$ROWS" <<'PY'
import json, sys
model, kiln, llama = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def find(rows, p, g):
    for r in rows:
        if r["n_prompt"] == p and r["n_gen"] == g:
            return r
for p, g, name in [(512, 0, "pp512"), (0, 128, "tg128")]:
    k, l = find(kiln, p, g), find(llama, p, g)
    print(json.dumps({"row": f"{model} | {name}", "kiln": k["avg_ts"], "llama": l["avg_ts"] if l else None}))
PY
  done
  path=$($KILN pull smollm2 2>/dev/null)
  kiln_json=$($KILN bench -m "$path" --concurrency 1,4,16 -p 128 -n 128 -r "$REPS" -t "$THREADS" --json 2>/dev/null)
  llama_out=''
  if [ -n "$LLAMA_BATCHED_BENCH" ]; then
    llama_out=$("$LLAMA_BATCHED_BENCH" -m "$path" -npp 128 -ntg 128 -npl 1,4,16 -t "$THREADS" -c 4096 2>/dev/null | grep '^|' || true)
  fi
  python3 - "$kiln_json" "$llama_out" >>"$ROWS" <<'PY'
import json, sys
kiln, llama = json.loads(sys.argv[1]), sys.argv[2]
tg = {}
for line in llama.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) >= 8 and cells[2].isdigit():
        tg[int(cells[2])] = float(cells[7])  # B column, S_TG t/s column
for r in kiln:
    n = r["n_parallel"]
    print(json.dumps({"row": f"smollm2, {n} sequences of 128+128 | decode", "kiln": r["avg_ts"], "llama": tg.get(n), "ttft_ms": r["ttft_ms"]}))
PY
  echo "round $round of $ROUNDS done" >&2
done

python3 - "$ROWS" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["row"], []).append(r)
rounds = int(sys.argv[2])
many = rounds > 1
print(f"| model | test | kiln t/s | llama.cpp t/s | ratio{' (median of rounds)' if many else ''} |" + (" rounds' ratios |" if many else ""))
print("|---|---|---:|---:|---:|" + ("---|" if many else ""))
for name, rs in rows.items():
    kiln = statistics.median(r["kiln"] for r in rs)
    pairs = [(r["kiln"], r["llama"]) for r in rs if r["llama"]]
    llama = statistics.median(l for _, l in pairs) if pairs else None
    ratios = [k / l for k, l in pairs]
    cells = [f"{kiln:.1f}", f"{llama:.1f}" if llama else "-", f"{statistics.median(ratios):.2f}x" if ratios else "-"]
    if many:
        cells.append(" ".join(f"{x:.2f}" for x in ratios) or "-")
    print(f"| {name} | " + " | ".join(cells) + " |")
ttft = [(name.split(" |")[0], statistics.median(r["ttft_ms"] for r in rs)) for name, rs in rows.items() if "ttft_ms" in rs[0]]
if ttft:
    print()
    print("kiln mean time to first token: " + "; ".join(f"{name} {ms:.0f} ms" for name, ms in ttft))
PY
