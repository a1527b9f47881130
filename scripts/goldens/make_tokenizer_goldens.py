"""Goldens for the regex splitters of tokenizer.json files (Llama 3, Qwen 2), from the
`tokenizers` package: a byte-level BPE trained on the corpus behind each splitter, and the
ids it gives every corpus string. Writes worker/tests/goldens/hf_tokenizers.json.

Needs: pip install tokenizers
"""
import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
from corpus import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
EXTRAS = ["IT'S ALL CAPS'LL DO", "line\r\n\r\n  next", "  \n \n  x", "tab\t\tword", "x  \n", "a1234567b", "¿Qué?", "naïve—dash", "'Re 'VE"]
strings = corpus() + EXTRAS
out = {}
for name, pattern in PATTERNS.items():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(strings * 3, trainer)
    out[name] = {"tokenizer": json.loads(tok.to_str()), "cases": [{"text": s, "ids": tok.encode(s).ids} for s in strings]}
path = ROOT / "worker" / "tests" / "goldens" / "hf_tokenizers.json"
path.write_text(json.dumps(out, ensure_ascii=False))
print(f"wrote {path}: {len(strings)} strings per splitter")
