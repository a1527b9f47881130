"""A decoder-only embedding fixture and its reference, from sentence-transformers.

Copies the tiny random-weight Qwen3 checkpoint (worker/tests/fixtures/hf/qwen3, made by
make_hf_fixtures.py) to worker/tests/fixtures/hf/qwen3-embedding, adds sentence-transformers
modules (last-token pooling, then Normalize, as Qwen3-Embedding has) and writes
reference.json: for a few texts, the token ids sentence-transformers feeds the model and the
embedding it returns (transformers' Qwen3Model underneath; CPU, float32, one text at a time).

Needs: pip install torch transformers sentence-transformers
"""
import json
import shutil
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "worker/tests/fixtures/hf/qwen3"
OUT = ROOT / "worker/tests/fixtures/hf/qwen3-embedding"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "café 12345", "def add(a, b): return a + b", "a"]

shutil.rmtree(OUT, ignore_errors=True)
OUT.mkdir(parents=True)
for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(SRC / f, OUT / f)
(OUT / "modules.json").write_text(json.dumps([
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
], indent=2))
(OUT / "1_Pooling").mkdir()
(OUT / "1_Pooling/config.json").write_text(json.dumps({
    "word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": True,
}, indent=2))

torch.manual_seed(0)
model = SentenceTransformer(str(OUT), device="cpu")
# Batches of one need no padding, but the tokenizer call asks for a pad token all the same.
model.tokenizer.pad_token = "<|endoftext|>"
cases = []
for text in TEXTS:
    ids = model.tokenize([text])["input_ids"][0].tolist()
    vector = model.encode([text], convert_to_numpy=True)[0]
    cases.append({"text": text, "ids": ids, "embedding": [float(f"{v:.9g}") for v in vector.tolist()]})
(OUT / "reference.json").write_text(json.dumps({
    "reference": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} (CPU, float32)",
    "cases": cases,
}, indent=0))
print(f"wrote {OUT}: {len(cases)} texts")
