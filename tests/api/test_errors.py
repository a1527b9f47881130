"""Bad requests get specific errors in OpenAI's shape, and never disturb the servers."""
import httpx2 as httpx
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]


def post(router, body, path="/v1/chat/completions", **kw):
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{router.url}{path}", content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(f"{router.url}{path}", json=body, **kw)


def error_of(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"}
    return e


def test_malformed_json(router):
    e = error_of(post(router, b'{"model": "smollm2", "messages": ['), 400)
    assert "not valid JSON" in e["message"]
    e = error_of(post(router, b"[1, 2]"), 400)
    assert "JSON object" in e["message"]


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", "hot", "expected a number"),
    ("temperature", 3.5, "out of range"),
    ("top_p", 0, "top_p"),
    ("max_tokens", 0, "out of range"),
    ("max_tokens", 1.5, "integer"),
    ("n", 500, "out of range"),
    ("top_logprobs", 3, "requires `logprobs`"),
    ("logit_bias", {"999999": 1}, "outside the vocabulary"),
    ("logit_bias", {"5": 500}, "out of range"),
    ("stop", ["a", 1], "stop[1]"),
    ("presence_penalty", -7, "out of range"),
    ("stream_options", {"include_usage": True}, "only allowed when `stream`"),
    ("frobnicate", 1, "not a recognized field"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "not supported"),
    ("response_format", {"type": "json_object"}, "response_format"),
])
def test_field_errors_name_the_field(router, model, field, value, needle):
    e = error_of(post(router, {"model": model, "messages": MSG, field: value}), 400)
    assert needle in e["message"]
    assert e["param"].split(".")[0].split("[")[0] == field


def test_message_errors(router, model):
    e = error_of(post(router, {"model": model, "messages": []}), 400)
    assert e["param"] == "messages"
    e = error_of(post(router, {"model": model}), 400)
    assert e["param"] == "messages"
    e = error_of(post(router, {"model": model, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert "wizard" in e["message"] and e["param"] == "messages[0].role"
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert e["param"] == "messages[0].content[0].type"
    e = error_of(post(router, {"messages": MSG}), 400)
    assert e["param"] == "model"


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model", messages=MSG)
    assert "no-such-model" in str(err.value)


def test_prompt_longer_than_context(router, model):
    long = "hello " * 5000
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": long}]}), 400)
    assert "tokens" in e["message"] and "4096" in e["message"]
    e = error_of(post(router, {"model": model, "prompt": long}, path="/v1/completions"), 400)
    assert "the model's context is 4096 tokens" in e["message"]
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": "hello " * 4000}], "max_tokens": 500}), 400)
    assert "in the prompt" in e["message"] and "500 for the completion" in e["message"]


def test_completions_errors(router, model):
    e = error_of(post(router, {"model": model, "prompt": ["a", "b"]}, path="/v1/completions"), 400)
    assert e["param"] == "prompt"
    e = error_of(post(router, {"model": model, "prompt": [1, 99999999]}, path="/v1/completions"), 400)
    assert e["param"] == "prompt[1]"
    e = error_of(post(router, {"model": model, "prompt": "x", "suffix": "y"}, path="/v1/completions"), 400)
    assert e["param"] == "suffix"


def test_servers_keep_serving_after_bad_requests(oai, router, model):
    for body in [b"\xff\xfe", b"{", b'{"model": 1}', b'{"model": "smollm2", "messages": [null]}',
                 b'{"model": "smollm2", "messages": [{"role": "user", "content": {"x": 1}}]}',
                 b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "seed": -5, "max_tokens": 1}']:
        r = post(router, body)
        assert r.status_code in (200, 400), (body, r.text)
    assert httpx.get(f"{router.url}/health").status_code == 200
    r = oai.chat.completions.create(model=model, messages=MSG, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_tokenize_and_detokenize_round_trip(router, model):
    t = httpx.post(f"{router.url}/tokenize", json={"model": model, "prompt": "Hello world", "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(f"{router.url}/detokenize", json={"model": model, "tokens": t["tokens"]}).json()
    assert d["prompt"] == "Hello world"
    e = error_of(httpx.post(f"{router.url}/detokenize", json={"tokens": [-1]}), 400)
    assert e["param"] == "tokens[0]"
