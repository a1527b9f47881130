"""How far kiln's and llama.cpp's scores lie from exact arithmetic on the same weights.

    python exact_reference.py SAMPLES.jsonl SMOLLM2.gguf

SAMPLES.jsonl is an lm-evaluation-harness `--log_samples` file of a run against kiln (see
compare_llama_cpp.py). For each scored continuation this computes SmolLM2 (a `llama` GGUF)
in float64 with numpy, on its weights dequantized exactly (`gguf.quants.dequantize`) and
activations never rounded: the function the quantized model defines, with none of the
rounding either engine adds (8-bit activations in the quantized products, 16-bit keys and
values, float32 sums). It prints, over all continuations, the mean and largest distance of
kiln's scores and of llama.cpp's (whole prompts per decode call, its default) from it.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from llama_cpp import Llama


def field(reader, name):
    f = reader.fields[name]
    return f.parts[f.data[0]][0]


class ExactLlama:
    """A llama-architecture GGUF evaluated in float64 (SmolLM2's features: tied output,
    grouped-query attention, llama.cpp's rotary pairs of adjacent dimensions)."""

    def __init__(self, path):
        r = GGUFReader(path)
        self.layers = int(field(r, "llama.block_count"))
        self.heads = int(field(r, "llama.attention.head_count"))
        self.kv_heads = int(field(r, "llama.attention.head_count_kv"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.base = float(field(r, "llama.rope.freq_base"))
        self.w = {}
        for t in r.tensors:
            values = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = values.reshape([int(d) for d in reversed(t.shape)]) if len(t.shape) > 1 else values.reshape(-1)
        self.head_dim = self.w["blk.0.attn_q.weight"].shape[0] // self.heads
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])

    def norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x):
        # x: [tokens, heads, head_dim]; pairs (2i, 2i + 1) rotate by position * base^(-2i/d).
        n, _, d = x.shape
        theta = self.base ** (-np.arange(0, d, 2) / d)
        angle = np.arange(n)[:, None] * theta[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def log_probs(self, tokens):
        """log-softmax of the logits at every position: [tokens, vocab]."""
        n, d = len(tokens), self.head_dim
        x = self.w["token_embd.weight"][tokens]
        mask = np.triu(np.full((n, n), -np.inf), 1)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"blk.{i}."
            h = self.norm(x, self.w[p + "attn_norm.weight"])
            q = self.rope((h @ self.w[p + "attn_q.weight"].T).reshape(n, self.heads, d))
            k = self.rope((h @ self.w[p + "attn_k.weight"].T).reshape(n, self.kv_heads, d))
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, self.kv_heads, d)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", scores, v).reshape(n, self.heads * d)
            x = x + attn @ self.w[p + "attn_output.weight"].T
            h = self.norm(x, self.w[p + "ffn_norm.weight"])
            gate, up = h @ self.w[p + "ffn_gate.weight"].T, h @ self.w[p + "ffn_up.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w[p + "ffn_down.weight"].T
        logits = self.norm(x, self.w["output_norm.weight"]) @ self.output.T
        top = logits.max(axis=-1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def main():
    samples_path, gguf_path = sys.argv[1], sys.argv[2]
    exact_model = ExactLlama(gguf_path)
    llama = Llama(model_path=gguf_path, logits_all=True, n_ctx=1024, n_threads=2, verbose=False)
    kiln_gaps, llama_gaps = [], []
    for line in open(samples_path):
        s = json.loads(line)
        for i, args in enumerate(s["arguments"].values()):
            context, continuation = args["arg_0"], args["arg_1"]
            # llama.cpp's tokenizer, which kiln's equals (worker/tests/goldens.rs).
            tokenize = lambda text: llama.tokenize(text.encode(), add_bos=False, special=True)
            whole, ctx = tokenize(context + continuation), tokenize(context)
            cont = whole[len(ctx):]
            lp = exact_model.log_probs(np.array(whole))
            exact = sum(lp[len(ctx) + j - 1, t] for j, t in enumerate(cont))
            llama.reset()
            llama.eval(whole)
            rows = np.array([llama.scores[len(ctx) + j - 1] for j in range(len(cont))], dtype=np.float64)
            rows = rows - rows.max(axis=-1, keepdims=True)
            rows = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
            batched = sum(rows[j, t] for j, t in enumerate(cont))
            kiln_gaps.append(abs(float(s["resps"][i][0][0]) - exact))
            llama_gaps.append(abs(batched - exact))
    print(f"{len(kiln_gaps)} continuations, distance from float64 on the dequantized weights: "
          f"kiln mean {np.mean(kiln_gaps):.4f} max {np.max(kiln_gaps):.4f}; "
          f"llama.cpp (whole prompts) mean {np.mean(llama_gaps):.4f} max {np.max(llama_gaps):.4f}")


if __name__ == "__main__":
    main()
