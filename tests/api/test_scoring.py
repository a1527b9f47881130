"""Scoring text as evaluation harnesses do, through the official `openai` client: `echo` with
`logprobs` on /v1/completions returns every prompt token's log-probability, checked against
llama.cpp's logits at each position (worker/tests/goldens/<model>.json, from
scripts/goldens/); and /tokenizer_info, which lm-evaluation-harness reads before tokenizing
through /tokenize."""
import json
import math

import httpx2 as httpx
import pytest

from conftest import MODEL, ROOT


def golden():
    path = ROOT / f"worker/tests/goldens/{MODEL}.json"
    if not path.exists():
        pytest.fail(f"no llama.cpp golden for model {MODEL} ({path})")
    return json.loads(path.read_text())["logits"]


def token_text(router, model, token):
    return httpx.post(f"{router.url}/detokenize", json={"model": model, "tokens": [token]}).json()["prompt"]


def test_echo_with_logprobs_scores_every_prompt_token_as_llama_cpp_does(oai, router, model):
    g = golden()
    ids = g["ids"][:96]
    r = oai.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and r.usage.prompt_tokens == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "the first token has none"
    assert r.choices[0].text.startswith(httpx.post(f"{router.url}/detokenize", json={"model": model, "tokens": ids}).json()["prompt"])
    worst = 0.0
    for pos in range(1, len(ids)):
        # Token `pos` is scored by the logits at position pos - 1.
        want = g["positions"][pos - 1]
        (text, value), = lp.top_logprobs[pos].items()
        assert text == token_text(router, model, want["top_ids"][0]), f"position {pos}"
        worst = max(worst, abs(value - want["top1_logprob"]))
        if ids[pos] == want["top_ids"][0]:
            assert lp.token_logprobs[pos] == value, f"position {pos}: the prompt token is the most likely one"
        else:
            assert lp.token_logprobs[pos] < value, f"position {pos}: a less likely token"
    assert worst <= 1e-4, f"log-probability of the most likely token within 1e-4 of llama.cpp's: {worst}"
    # The generated token follows the prompt's, greedy: llama.cpp's most likely at the end.
    (_, after), = lp.top_logprobs[len(ids)].items()
    assert lp.token_logprobs[len(ids)] == after
    assert math.isclose(after, g["positions"][len(ids) - 1]["top1_logprob"], abs_tol=1e-4)


def test_streamed_echo_carries_the_same_prompt_logprobs(oai, model):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    full = oai.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True, stream=True))
    tokens, values, tops = [], [], []
    for c in chunks:
        for ch in c.choices:
            if ch.logprobs:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
                tops += ch.logprobs.top_logprobs
    want = full.choices[0].logprobs
    assert tokens == want.tokens and values == want.token_logprobs and tops == want.top_logprobs
    assert all(len(t) == 2 for t in want.top_logprobs[1:])
    assert "".join(ch.text for c in chunks for ch in c.choices) == full.choices[0].text


def test_a_continuation_scores_as_lm_evaluation_harness_reads_it(oai, router, model):
    """lm-evaluation-harness's loglikelihood requests: context + continuation as token ids,
    echo, logprobs 1, max_tokens 1; it sums token_logprobs[len(context):-1] and calls the
    continuation greedy when each of its tokens is the top one."""
    def score(context, continuation):
        tok = lambda text: httpx.post(f"{router.url}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False}).json()["tokens"]
        ctx, cont = tok(context), tok(continuation)
        r = oai.completions.create(model=model, prompt=[ctx + cont], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
        lp = r.choices[0].logprobs
        values = lp.token_logprobs[len(ctx):-1]
        greedy = all(v == max(top.values()) for v, top in zip(values, lp.top_logprobs[len(ctx):-1]))
        assert len(values) == len(cont)
        return sum(values), greedy

    right, right_greedy = score("The capital of France is", " Paris")
    wrong, _ = score("The capital of France is", " Banana")
    assert right_greedy, "the model's own greedy continuation"
    assert right > wrong + 5, (right, wrong)
    # Scoring takes the whole prompt every time; a cached prefix changes nothing.
    assert score("The capital of France is", " Paris") == (right, right_greedy)


def test_max_tokens_zero_with_echo_returns_the_scored_prompt_alone(oai, model):
    prompt = "The capital of France is Paris"
    one = oai.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True).choices[0]
    zero = oai.completions.create(model=model, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert zero.choices[0].text == prompt and zero.choices[0].finish_reason == "length"
    assert zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == one.logprobs.token_logprobs[:-1]
    assert zero.choices[0].logprobs.tokens == one.logprobs.tokens[:-1]


def test_tokenizer_info_gives_what_lm_evaluation_harness_reads(router, model):
    info = httpx.get(f"{router.url}/tokenizer_info").json()
    assert info["model"] == model
    assert isinstance(info["eos_token"], str) and info["eos_token"]
    eos = httpx.post(f"{router.url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert len(eos) == 1, "the end-of-sequence text is one token"
    assert info["model_max_length"] > 0 and info["vocab_size"] > 0
    assert info["chat_template"] is None or "{%" in info["chat_template"]
    assert httpx.get(f"{router.url}/tokenizer_info", params={"model": "nope"}).status_code == 404
