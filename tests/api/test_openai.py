"""The OpenAI routes driven by the official `openai` client."""
import httpx2 as httpx

QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]


def chat(oai, model, **kw):
    kw.setdefault("messages", QUESTION)
    return oai.chat.completions.create(model=model, **kw)


def test_models_lists_the_served_model(oai, model):
    ids = [m.id for m in oai.models.list()]
    assert ids == [model]
    assert oai.models.retrieve(model).id == model


def test_stream_text_equals_non_stream_text_at_temperature_zero(oai, model):
    full = chat(oai, model, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    pieces, finish, usage = [], None, None
    for chunk in chat(oai, model, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_counts_match_the_tokenizer(oai, router, model):
    r = chat(oai, model, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    counted = httpx.post(f"{router.url}/tokenize", json={"model": model, "messages": QUESTION}).json()["count"]
    assert r.usage.prompt_tokens == counted
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == counted + 7
    assert r.choices[0].finish_reason == "length"


def test_completions_plain_prompt(oai, model):
    r = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip().startswith("Paris")
    echoed = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_several_prompts_in_one_request_equal_each_alone(oai, model):
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
    alone = [oai.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts]
    r = oai.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in alone for _ in range(2)]
    counted = sum(len(oai.completions.create(model=model, prompt=p, max_tokens=1, temperature=0, echo=True, logprobs=0).choices[0].logprobs.tokens) - 1 for p in prompts)
    assert r.usage.prompt_tokens == counted
    streamed = [""] * 6
    for chunk in oai.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in r.choices]


def test_completions_without_max_tokens_stop_at_openais_default(oai, model):
    # OpenAI's legacy completions generate 16 tokens when the request names no budget; a
    # rambling base-model continuation must not run on to the end of the context.
    r = oai.completions.create(model=model, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length", r


def test_n_choices(oai, model):
    r = chat(oai, model, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens <= 3 * 12
    assert len({c.message.content for c in r.choices}) >= 2, "three samples at temperature 1 were all identical"
    streamed = {0: "", 1: "", 2: ""}
    for chunk in chat(oai, model, max_tokens=12, temperature=1.0, seed=11, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]


def test_logprobs_and_top_logprobs(oai, model):
    r = chat(oai, model, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.token == entry.top_logprobs[0].token
        assert abs(entry.logprob - lps[0]) < 1e-6
    assert "".join(e.token for e in content) == r.choices[0].message.content
    c = oai.completions.create(model=model, prompt="One, two, three,", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3
    assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_seed_reproduces_samples(oai, model):
    a = chat(oai, model, max_tokens=16, temperature=1.0, seed=1234)
    b = chat(oai, model, max_tokens=16, temperature=1.0, seed=1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {chat(oai, model, max_tokens=16, temperature=1.0, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a.choices[0].message.content}) >= 2


def test_stop_sequences(oai, model):
    free = chat(oai, model, max_tokens=24, temperature=0).choices[0].message.content
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]
    cut = free[: free.index(stop)]
    r = chat(oai, model, max_tokens=24, temperature=0, stop=[stop, "zzzz-unused"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        oai, model, max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_sampling_fields_change_the_output(oai, router, model):
    greedy = chat(oai, model, max_tokens=12, temperature=0).choices[0].message.content
    # A strong bias against the greedy first token must change the answer.
    first = chat(oai, model, max_tokens=1, temperature=0, logprobs=True, top_logprobs=1).choices[0].logprobs.content[0]
    first_id = httpx.post(f"{router.url}/tokenize",
                          json={"model": model, "prompt": first.token, "add_special_tokens": False}).json()["tokens"]
    assert len(first_id) == 1
    biased = chat(oai, model, max_tokens=12, temperature=0, logit_bias={str(first_id[0]): -100}).choices[0].message.content
    assert biased != greedy
    assert not biased.startswith(first.token)
    penalized = chat(oai, model, max_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0,
                     extra_body={"repetition_penalty": 1.5}).choices[0].message.content
    long = chat(oai, model, max_tokens=40, temperature=0).choices[0].message.content
    assert penalized != long
    topk = chat(oai, model, max_tokens=12, temperature=2.0, seed=5, extra_body={"top_k": 1, "min_p": 0.0}).choices[0].message.content
    assert topk == greedy, "top_k=1 must be greedy whatever the temperature"
    topp = chat(oai, model, max_tokens=12, temperature=2.0, seed=5, top_p=1e-6).choices[0].message.content
    assert topp == greedy


def test_user_and_content_parts_are_accepted(oai, model):
    a = chat(oai, model, max_tokens=8, temperature=0, user="tester-1")
    b = chat(oai, model, max_tokens=8, temperature=0,
             messages=[{"role": "user", "content": [{"type": "text", "text": "Name three colors "},
                                                     {"type": "text", "text": "of the rainbow."}]}])
    assert a.choices[0].message.content == b.choices[0].message.content


def test_roles_system_assistant_tool(oai, model):
    r = chat(oai, model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "tool", "content": "result: 4", "tool_call_id": "call_1"},
        {"role": "user", "content": "And 3+3?"},
    ])
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 30
