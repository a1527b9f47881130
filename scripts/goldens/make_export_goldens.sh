#!/usr/bin/env bash
# Goldens for GGUF export: each fixture written by `kiln-worker quantize` (q8_0, and every
# quantization type for llama-wide) and run greedily by llama.cpp's llama-simple (16 tokens);
# its output bytes go to
# worker/tests/goldens/llamacpp_export.json, which worker/tests/gguf_export.rs compares with
# kiln on the same files. Usage: LLAMA_SIMPLE=/path/to/llama-simple scripts/goldens/make_export_goldens.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LLAMA_SIMPLE:?set LLAMA_SIMPLE to the llama-simple binary of llama.cpp}"
PROMPT="The quick brown fox jumps over the lazy dog. 12345 café!"
# Tiny random models fall into repeating one token after some prompts; these two get one
# under which their continuations vary, so the comparison means something.
OTHER_PROMPT="café naïve résumé 12345 67890"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
entries=()
# name, fixture, quantization, prompt
runs=()
for f in qwen3 llama-wide mixtral qwen3moe; do runs+=("$f|$f|q8_0|$PROMPT"); done
for f in qwen2 gemma2-tied; do runs+=("$f|$f|q8_0|$OTHER_PROMPT"); done
# Every quantization kiln writes, on the fixture whose rows take every format.
for q in q4_0 q4_1 q5_0 q5_1 q2k q3k q4k q5k q6k; do runs+=("llama-wide-$q|llama-wide|$q|$PROMPT"); done
for run in "${runs[@]}"; do
    IFS='|' read -r name f q prompt <<< "$run"
    target/release/kiln-worker quantize -m "worker/tests/fixtures/hf/$f" --isq "$q" -o "$tmp/$name.gguf" 2>/dev/null
    "$LLAMA_SIMPLE" -m "$tmp/$name.gguf" -n 16 "$prompt" 2>/dev/null > "$tmp/$name.out"
    hex=$(python3 scripts/goldens/after_prompt_hex.py "$tmp/$name.out" "$prompt")
    p=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1], ensure_ascii=False))' "$prompt")
    entries+=("\"$name\": {\"fixture\": \"$f\", \"isq\": \"$q\", \"prompt\": $p, \"tokens\": 16, \"llama_cpp_hex\": \"$hex\"}")
done
( IFS=,; echo "{\"models\": {${entries[*]}}}" ) > worker/tests/goldens/llamacpp_export.json
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
