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
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON Schema object"),
    ("response_format", {"type": "yaml"}, "unknown type"),
    ("functions", [{"name": "f"}], "not supported"),
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
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}), 400)
    assert e["param"] == "messages[0].content[0].type"
    # Images are read (docs/vision.md): a URL that is neither data: nor http(s) is refused by
    # its field, and a text-only model refuses an image.
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert e["param"] == "messages[0].content[0].image_url.url" and "data: URL" in e["message"]
    tiny_png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    e = error_of(post(router, {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": tiny_png}}]}]}), 400)
    assert "does not take images" in e["message"] and e["param"] == "messages[0].content[0].image_url.url"
    # `model` may be left out while one text-generation model is served (as vLLM's and
    # llama.cpp's servers allow); a wrong type is still refused.
    r = post(router, {"messages": MSG, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == model, r.text
    e = error_of(post(router, {"model": 7, "messages": MSG}), 400)
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
    e = error_of(post(router, {"model": model, "prompt": ["a", {"b": 1}]}, path="/v1/completions"), 400)
    assert e["param"] == "prompt[1]"
    e = error_of(post(router, {"model": model, "prompt": []}, path="/v1/completions"), 400)
    assert e["param"] == "prompt"
    e = error_of(post(router, {"model": model, "prompt": ["a"] * 257}, path="/v1/completions"), 400)
    assert e["param"] == "prompt" and "256" in e["message"]
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


@pytest.fixture(scope="module")
def strict_router(worker):
    """A router with small limits, to reach each of them cheaply."""
    from conftest import Router
    r = Router("limits", [worker.grpc], "--max-body-bytes", "4096", "--client-timeout-secs", "1", "--max-messages", "3",
               "--max-n", "2", "--max-stop-sequences", "2", "--max-stop-bytes", "8", "--max-tokens", "32")
    yield r
    r.stop()


@pytest.mark.parametrize("body,param,needle", [
    ({"messages": MSG * 4}, "messages", "at most 3"),
    ({"messages": MSG, "n": 3}, "n", "out of range"),
    ({"messages": MSG, "stop": ["a", "b", "c"]}, "stop", "at most 2"),
    ({"messages": MSG, "stop": ["a", "123456789"]}, "stop[1]", "at most 8"),
    ({"messages": MSG, "max_tokens": 33}, "max_tokens", "allows (32)"),
    ({"messages": MSG, "max_completion_tokens": 33}, "max_completion_tokens", "allows (32)"),
])
def test_request_limits_name_the_limit(strict_router, model, body, param, needle):
    e = error_of(post(strict_router, {"model": model, **body}), 400)
    assert needle in e["message"] and e["param"] == param, e


def test_anthropic_limits_use_its_error_shape(strict_router, model):
    r = post(strict_router, {"model": model, "max_tokens": 64, "messages": MSG}, path="/v1/messages")
    assert r.status_code == 400 and r.json()["type"] == "error" and "allows (32)" in r.json()["error"]["message"]
    r = post(strict_router, b'{"model": "x", "max_tokens": 1, "messages": []}' + b" " * 5000, path="/v1/messages")
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_body_over_the_limit_is_a_json_413(strict_router, model):
    e = error_of(post(strict_router, {"model": model, "messages": [{"role": "user", "content": "x" * 5000}]}), 413)
    assert "4096 bytes" in e["message"]
    # Within the limits the same router answers.
    ok = post(strict_router, {"model": model, "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def raw_exchange(router, payload, wait=5.0):
    """Sends `payload` on a fresh connection; returns (seconds until the server answered or
    closed, what it sent), or (None, b"") if it kept the connection open past `wait`."""
    import socket
    import time
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(wait)
        if payload:
            s.sendall(payload)
        start = time.monotonic()
        try:
            data = s.recv(4096)
        except socket.timeout:
            return None, b""
        return time.monotonic() - start, data


def test_slow_clients_do_not_hold_connections(strict_router):
    # Sends nothing at all.
    took, data = raw_exchange(strict_router, b"")
    assert took is not None and took < 3 and data == b"", "an idle connection stays open"
    # Trickles its headers and stops.
    took, data = raw_exchange(strict_router, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert took is not None and took < 3, "a connection with half its headers stays open"
    # Announces a body and sends part of it: a JSON 408.
    took, data = raw_exchange(strict_router, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                             b"content-length: 100\r\n\r\n{\"model\"")
    assert took is not None and took < 3 and data.startswith(b"HTTP/1.1 408"), data
    assert b"did not arrive within 1 s" in data
    assert httpx.get(f"{strict_router.url}/health").status_code == 200
