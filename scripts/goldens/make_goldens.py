"""Reference outputs of llama.cpp for kiln's golden tests.

    pip install llama-cpp-python==0.3.36 jinja2 numpy
    python3 scripts/goldens/make_goldens.py            # both models, files in worker/tests/goldens/

llama.cpp runs through its C API (llama-cpp-python's ctypes bindings) with default model
parameters, flash attention off, and one token per decode call. Token-at-a-time evaluation is
deliberate: llama.cpp's batched prompt path sums attention in a different order (its tinyBLAS
kernels) than its single-token path, so its own logits depend on batch shape by up to ~0.5.
kiln sums in the single-token order for every batch shape, and these goldens hold it to that.

Each file records, for one model:
  tokenizer  ids of every corpus string, as plain text (no BOS, specials not parsed) and as a
             raw prompt (BOS per the model, specials parsed)
  greedy     the first 32 greedy tokens after each prompt (raw completion)
  logits     teacher-forced over a long text: per position the ten highest logits and the
             log-probability of the best token
  chat       a multi-turn conversation rendered by the reference template engine and tokenized,
             and the greedy answer (up to 24 tokens, ending at an end-of-generation token) to a
             single question rendered the same way
"""
import ctypes, json, os, sys
import numpy as np
import llama_cpp as L

sys.path.insert(0, os.path.dirname(__file__))
from corpus import corpus

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "worker", "tests", "goldens")
MODELS = os.environ.get("KILN_HOME", os.path.expanduser("~/.cache/kiln")) + "/models"

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "Here is a list of fruits:\n1.",
    "In 1492, Christopher Columbus",
    "Machine learning is a field of",
    "The quick brown fox",
    "import numpy as np\n",
]

TEACHER_TEXT = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology and includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. These concepts are implicit in concrete practices such as "
    "one-to-one correspondence, the basis of counting, comparison to a standard, used for measurement, "
    "and the 3-4-5 right triangle, a device for assuring a right angle.\n\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n"
    "Q: What is the boiling point of water at sea level?\nA: 100 degrees Celsius, or 212 degrees Fahrenheit.\n"
    "Q: Who wrote Pride and Prejudice?\nA: Jane Austen, first published in 1813.\n"
    "The mitochondria is the powerhouse of the cell; it produces most of the chemical energy needed to "
    "power the cell's biochemical reactions. Chemical energy produced by the mitochondria is stored in a "
    "small molecule called adenosine triphosphate (ATP)."
)

QUESTION = "What is the capital of France?"

CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
    {"role": "user", "content": "And its population, roughly?"},
]


class Model:
    def __init__(self, path):
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"cannot load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text, add_special, parse_special):
        data = text.encode()
        buf = (L.llama_token * (len(data) * 2 + 16))()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"tokenize failed for {text!r}")
        return list(buf[:n])

    def context(self, n_ctx):
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, 1, 1
        p.n_threads = p.n_threads_batch = 2
        p.flash_attn_type = 0  # disabled
        return L.llama_init_from_model(self.model, p)

    def run(self, ctx, tokens):
        """Decodes tokens one at a time; returns the logits after each."""
        rows = []
        for t in tokens:
            one = (L.llama_token * 1)(t)
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("decode failed")
            ptr = L.llama_get_logits_ith(ctx, -1)
            rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return rows


def reference_chat_smollm(template, messages):
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")


def reference_chat_llama_cpp(tmpl_name, messages):
    msgs = (L.llama_chat_message * len(messages))()
    keep = []
    for m, src in zip(msgs, messages):
        role, content = src["role"].encode(), src["content"].encode()
        keep += [role, content]
        m.role, m.content = role, content
    buf = ctypes.create_string_buffer(8192)
    n = L.llama_chat_apply_template(tmpl_name.encode(), msgs, len(messages), True, buf, len(buf))
    return buf.raw[:n].decode()


def make(name, file_name, chat_renderer):
    path = os.path.join(MODELS, file_name)
    m = Model(path)
    print(f"{name}: tokenizer", flush=True)
    tok = [{"text": s, "plain": m.tokenize(s, False, False), "raw": m.tokenize(s, True, True)} for s in corpus()]

    print(f"{name}: greedy", flush=True)
    greedy = []
    for prompt in PROMPTS:
        ids = m.tokenize(prompt, True, True)
        ctx = m.context(256)
        logits = m.run(ctx, ids)[-1]
        out = []
        for _ in range(32):
            t = int(np.argmax(logits))
            out.append(t)
            logits = m.run(ctx, [t])[-1]
        L.llama_free(ctx)
        greedy.append({"prompt": prompt, "prompt_ids": ids, "generated": out})

    print(f"{name}: teacher-forced logits", flush=True)
    ids = m.tokenize(TEACHER_TEXT, True, True)
    ctx = m.context(1024)
    rows = m.run(ctx, ids)
    L.llama_free(ctx)
    positions = []
    for row in rows:
        top = np.argsort(-row, kind="stable")[:10]
        logsum = float(np.log(np.sum(np.exp(row.astype(np.float64) - row.max()))) + row.max())
        positions.append({
            "top_ids": [int(i) for i in top],
            "top_logits": [float(row[i]) for i in top],
            "top1_logprob": float(row[top[0]]) - logsum,
        })

    rendered = chat_renderer(m, CHAT)
    question = [{"role": "user", "content": QUESTION}]
    q_ids = m.tokenize(chat_renderer(m, question), False, True)
    ctx = m.context(256)
    logits = m.run(ctx, q_ids)[-1]
    answer = []
    for _ in range(24):
        t = int(np.argmax(logits))
        if L.llama_vocab_is_eog(m.vocab, t):
            break
        answer.append(t)
        logits = m.run(ctx, [t])[-1]
    L.llama_free(ctx)
    chat = {
        "messages": CHAT,
        "rendered": rendered,
        "ids": m.tokenize(rendered, False, True),
        "question": QUESTION,
        "question_ids": q_ids,
        "answer": answer,
    }
    doc = {
        "model": name,
        "file": file_name,
        "reference": "llama.cpp 0c1e570 via llama-cpp-python 0.3.36; one token per decode, flash attention off",
        "tokenizer": tok,
        "greedy": greedy,
        "logits": {"text": TEACHER_TEXT, "ids": ids, "positions": positions},
        "chat": chat,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
    print(f"{name}: wrote {len(tok)} tokenizer cases, {len(greedy)} prompts, {len(positions)} positions")


def smollm_chat(m, messages):
    buf = ctypes.create_string_buffer(1 << 16)
    L.llama_model_meta_val_str(m.model, b"tokenizer.chat_template", buf, len(buf))
    return reference_chat_smollm(buf.value.decode(), messages)


if __name__ == "__main__":
    which = sys.argv[1:] or ["smollm2", "gemma3"]
    if "smollm2" in which:
        make("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", smollm_chat)
    if "gemma3" in which:
        # The file has no template; the reference is llama.cpp's built-in Gemma format, which
        # leaves BOS to the tokenizer.
        make("gemma3", "gemma-3-270m-q4_k_m.gguf", lambda m, msgs: "<bos>" + reference_chat_llama_cpp("gemma", msgs))
