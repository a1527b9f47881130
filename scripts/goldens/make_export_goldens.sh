#!/usr/bin/env bash
# Goldens for GGUF export: each fixture written by `kiln-worker quantize --isq q8_0` and run
# greedily by llama.cpp's llama-simple (16 tokens); its output bytes go to
# worker/tests/goldens/llamacpp_export.json, which worker/tests/gguf_export.rs compares with
# kiln on the same files. Usage: LLAMA_SIMPLE=/path/to/llama-simple scripts/goldens/make_export_goldens.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LLAMA_SIMPLE:?set LLAMA_SIMPLE to the llama-simple binary of llama.cpp}"
PROMPT="The quick brown fox jumps over the lazy dog. 12345 café!"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
entries=()
for f in qwen2 qwen3 llama-wide mixtral qwen3moe gemma2-tied; do
    target/release/kiln-worker quantize -m "worker/tests/fixtures/hf/$f" --isq q8_0 -o "$tmp/$f.gguf" 2>/dev/null
    "$LLAMA_SIMPLE" -m "$tmp/$f.gguf" -n 16 "$PROMPT" 2>/dev/null > "$tmp/$f.out"
    hex=$(python3 scripts/goldens/after_prompt_hex.py "$tmp/$f.out" "$PROMPT")
    entries+=("\"$f\": {\"isq\": \"q8_0\", \"tokens\": 16, \"llama_cpp_hex\": \"$hex\"}")
done
( IFS=,; echo "{\"prompt\": \"$PROMPT\", \"models\": {${entries[*]}}}" ) > worker/tests/goldens/llamacpp_export.json
echo "wrote worker/tests/goldens/llamacpp_export.json"

# The tokenizer kinds llama.cpp reads from GGUF (SentencePiece-style BPE as `llama`, byte-level
# BPE with added tokens as `gpt2`): llama-tokenize's ids for each fixture's own prompt, and
# llama-simple's greedy continuation. Goes to worker/tests/goldens/llamacpp_export_tokenizers.json.
LLAMA_TOKENIZE=${LLAMA_TOKENIZE:-$(dirname "$LLAMA_SIMPLE")/llama-tokenize}
entries=()
for f in tok-spm_bpe_normalizer tok-spm_bpe_metaspace tok-byte_level_added; do
    prompt=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['prompt'])" "worker/tests/fixtures/hf/$f/reference.json")
    target/release/kiln-worker quantize -m "worker/tests/fixtures/hf/$f" --isq q8_0 -o "$tmp/$f.gguf" 2>/dev/null
    ids=$("$LLAMA_TOKENIZE" -m "$tmp/$f.gguf" -p "$prompt" --ids --log-disable 2>/dev/null | tail -1)
    "$LLAMA_SIMPLE" -m "$tmp/$f.gguf" -n 16 "$prompt" 2>/dev/null > "$tmp/$f.out"
    hex=$(python3 scripts/goldens/after_prompt_hex.py "$tmp/$f.out" "$prompt")
    entries+=("\"$f\": {\"isq\": \"q8_0\", \"tokens\": 16, \"llama_cpp_ids\": $ids, \"llama_cpp_hex\": \"$hex\"}")
done
( IFS=,; echo "{\"models\": {${entries[*]}}}" ) > worker/tests/goldens/llamacpp_export_tokenizers.json
echo "wrote worker/tests/goldens/llamacpp_export_tokenizers.json"
