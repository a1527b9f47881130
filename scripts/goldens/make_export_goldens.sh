#!/usr/bin/env bash
# Goldens for GGUF export: each fixture written by `kiln-worker quantize` (q8_0, and every
# quantization type for llama-wide) and continued greedily by llama.cpp (16 tokens, one token
# per decode call: llama_greedy.c, built here against the given llama.cpp build); its output
# bytes go to worker/tests/goldens/llamacpp_export.json, which worker/tests/gguf_export.rs
# compares with kiln on the same files.
#
# One token per call, as the model goldens are made (make_goldens.py): llama.cpp's batched
# prompt path sums in other orders than its single-token path, and on these tiny random
# models (logits within a few hundredths of each other) that alone parts continuations; kiln
# sums in the single-token order for every batch shape.
#
# Usage: LLAMA_BUILD=/path/to/llama.cpp/build/bin scripts/goldens/make_export_goldens.sh
# (LLAMA_BUILD holds libllama.so and llama-tokenize; the headers come from the source tree
# its CMake cache names, or from LLAMA_SRC).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LLAMA_BUILD:?set LLAMA_BUILD to the bin directory of a llama.cpp build}"
LLAMA_SRC=${LLAMA_SRC:-$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$LLAMA_BUILD/../CMakeCache.txt")}
PROMPT="The quick brown fox jumps over the lazy dog. 12345 café!"
# Tiny random models fall into repeating one token after some prompts; these two get one
# under which their continuations vary, so the comparison means something.
OTHER_PROMPT="café naïve résumé 12345 67890"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cc -O2 -o "$tmp/llama_greedy" scripts/goldens/llama_greedy.c -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include" \
    -L"$LLAMA_BUILD" -lllama -Wl,-rpath,"$(cd "$LLAMA_BUILD" && pwd)"
entries=()
# name, fixture, quantization, prompt
runs=()
for f in qwen3 llama-wide mixtral qwen3moe; do runs+=("$f|$f|q8_0|$PROMPT"); done
for f in qwen2 gemma2-tied gemma3; do runs+=("$f|$f|q8_0|$OTHER_PROMPT"); done
# Every quantization kiln writes, on the fixture whose rows take every format.
for q in q4_0 q4_1 q5_0 q5_1 q2k q3k q4k q5k q6k; do runs+=("llama-wide-$q|llama-wide|$q|$PROMPT"); done
for run in "${runs[@]}"; do
    IFS='|' read -r name f q prompt <<< "$run"
    target/release/kiln-worker quantize -m "worker/tests/fixtures/hf/$f" --isq "$q" -o "$tmp/$name.gguf" 2>/dev/null
    hex=$("$tmp/llama_greedy" "$tmp/$name.gguf" 16 "$prompt" | od -An -v -tx1 | tr -d ' \n')
    p=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1], ensure_ascii=False))' "$prompt")
    entries+=("\"$name\": {\"fixture\": \"$f\", \"isq\": \"$q\", \"prompt\": $p, \"tokens\": 16, \"llama_cpp_hex\": \"$hex\"}")
done
( IFS=,; echo "{\"models\": {${entries[*]}}}" ) > worker/tests/goldens/llamacpp_export.json
echo "wrote worker/tests/goldens/llamacpp_export.json"

# The tokenizer kinds llama.cpp reads from GGUF (SentencePiece-style BPE as `llama`, byte-level
# BPE with added tokens as `gpt2`): llama-tokenize's ids for each fixture's own prompt, and
# llama.cpp's greedy continuation. Goes to worker/tests/goldens/llamacpp_export_tokenizers.json.
LLAMA_TOKENIZE=${LLAMA_TOKENIZE:-$LLAMA_BUILD/llama-tokenize}
entries=()
for f in tok-spm_bpe_normalizer tok-spm_bpe_metaspace tok-byte_level_added; do
    prompt=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['prompt'])" "worker/tests/fixtures/hf/$f/reference.json")
    target/release/kiln-worker quantize -m "worker/tests/fixtures/hf/$f" --isq q8_0 -o "$tmp/$f.gguf" 2>/dev/null
    ids=$("$LLAMA_TOKENIZE" -m "$tmp/$f.gguf" -p "$prompt" --ids --log-disable 2>/dev/null | tail -1)
    hex=$("$tmp/llama_greedy" "$tmp/$f.gguf" 16 "$prompt" | od -An -v -tx1 | tr -d ' \n')
    entries+=("\"$f\": {\"isq\": \"q8_0\", \"tokens\": 16, \"llama_cpp_ids\": $ids, \"llama_cpp_hex\": \"$hex\"}")
done
( IFS=,; echo "{\"models\": {${entries[*]}}}" ) > worker/tests/goldens/llamacpp_export_tokenizers.json
echo "wrote worker/tests/goldens/llamacpp_export_tokenizers.json"
