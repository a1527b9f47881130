"""Recomputes the log-likelihoods of an lm-evaluation-harness run against kiln with llama.cpp
(llama-cpp-python, same GGUF file) and reports how far apart they are.

    python compare_llama_cpp.py SAMPLES.jsonl MODEL.gguf [ROUTER_URL]

SAMPLES.jsonl is what `lm_eval --log_samples` wrote for a loglikelihood or multiple-choice
task run with `--model local-completions`. Prompts are tokenized by kiln's /tokenize, as the
harness did with `tokenizer_backend=remote`, so only the model's arithmetic is compared.

llama.cpp runs twice: one token per decode call (the path kiln's golden tests hold it to, bit
for bit, whatever kiln's own batch) and whole prompts per call (its default), whose results
depend on the batch.
"""
import json
import math
import sys
import urllib.request

from llama_cpp import Llama


def tokenize(url, text):
    body = json.dumps({"prompt": text, "add_special_tokens": False}).encode()
    req = urllib.request.Request(f"{url}/tokenize", body, {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["tokens"]


def log_softmax_at(row, token):
    top = max(row)
    return row[token] - (top + math.log(sum(math.exp(x - top) for x in row)))


def main():
    samples_path, gguf = sys.argv[1], sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else "http://127.0.0.1:8080"
    for name, batch in [("one token per decode", 1), ("whole prompts", 512)]:
        llm = Llama(model_path=gguf, logits_all=True, n_ctx=1024, n_threads=2, n_batch=batch, n_ubatch=batch, verbose=False)
        print(f"llama.cpp, {name}: {compare(llm, samples_path, url)}")


def compare(llm, samples_path, url):
    worst, greedy_agree, count, kiln_acc, ref_acc = 0.0, 0, 0, 0, 0
    for line in open(samples_path):
        s = json.loads(line)
        kiln_scores, ref_scores = [], []
        for i, args in enumerate(s["arguments"].values()):
            context, continuation = args["arg_0"], args["arg_1"]
            # The harness's split: the continuation's tokens are what follows the context's.
            whole, ctx = tokenize(url, context + continuation), tokenize(url, context)
            cont = whole[len(ctx):]
            llm.reset()
            llm.eval(whole)
            rows = [list(llm.scores[len(ctx) + j - 1]) for j in range(len(cont))]
            ref = sum(log_softmax_at(r, t) for r, t in zip(rows, cont))
            ref_greedy = all(max(range(len(r)), key=r.__getitem__) == t for r, t in zip(rows, cont))
            kiln, kiln_greedy = float(s["resps"][i][0][0]), s["resps"][i][0][1] == "True"
            worst = max(worst, abs(kiln - ref))
            greedy_agree += int(kiln_greedy == ref_greedy)
            count += 1
            kiln_scores.append(kiln)
            ref_scores.append(ref)
        target = int(s["target"])
        kiln_acc += int(max(range(len(kiln_scores)), key=kiln_scores.__getitem__) == target)
        ref_acc += int(max(range(len(ref_scores)), key=ref_scores.__getitem__) == target)
    return (f"{count} log-likelihoods, max |kiln - llama.cpp| = {worst:.2e}, is_greedy agrees on "
            f"{greedy_agree}/{count}, right answers kiln {kiln_acc} / llama.cpp {ref_acc}")


if __name__ == "__main__":
    main()
