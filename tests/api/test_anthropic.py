"""The Anthropic routes driven by the official `anthropic` client."""
import httpx2 as httpx

HELLO = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_message_and_stream_agree(claude, model):
    full = claude.messages.create(model=model, max_tokens=24, extra_body={"temperature": 0}, messages=HELLO)
    assert full.type == "message" and full.role == "assistant"
    assert full.content[0].type == "text" and full.content[0].text
    assert full.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model=model, max_tokens=24, extra_body={"temperature": 0}, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens


def test_stream_event_sequence(router, model):
    body = {"model": model, "max_tokens": 4, "temperature": 0, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{router.url}/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) <= {"content_block_delta"} and len(names[3:-3]) >= 1
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_message_start_reports_the_cache_hit_as_the_final_usage_does(claude, model):
    # A long system prompt sent twice: the second time most of it comes from the prefix cache,
    # and the stream's first event already says so.
    system = "You answer questions about the rainbow. " * 20
    claude.messages.create(model=model, max_tokens=2, system=system, messages=HELLO)
    with claude.messages.stream(model=model, max_tokens=4, system=system, messages=HELLO) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.cache_read_input_tokens >= 64, start.message.usage
    assert start.message.usage.cache_read_input_tokens == final.usage.cache_read_input_tokens
    assert start.message.usage.input_tokens == final.usage.input_tokens
    counted = claude.messages.count_tokens(model=model, system=system, messages=HELLO).input_tokens
    assert start.message.usage.input_tokens + start.message.usage.cache_read_input_tokens == counted


def test_count_tokens_matches_usage(claude, model):
    system = "You are terse."
    counted = claude.messages.count_tokens(model=model, system=system, messages=HELLO).input_tokens
    r = claude.messages.create(model=model, max_tokens=2, system=system, messages=HELLO)
    assert counted == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    without = claude.messages.count_tokens(model=model, messages=HELLO).input_tokens
    assert without != counted


def test_stop_sequences_and_max_tokens(claude, model):
    free = claude.messages.create(model=model, max_tokens=24, extra_body={"temperature": 0}, messages=HELLO).content[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]
    r = claude.messages.create(model=model, max_tokens=24, extra_body={"temperature": 0}, messages=HELLO, stop_sequences=[stop])
    assert r.stop_reason == "stop_sequence"
    assert r.stop_sequence == stop
    assert r.content[0].text == free[: free.index(stop)]
    short = claude.messages.create(model=model, max_tokens=3, extra_body={"temperature": 0}, messages=HELLO)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_sampling_fields(claude, model):
    greedy = claude.messages.create(model=model, max_tokens=10, extra_body={"temperature": 0}, messages=HELLO).content[0].text
    top1 = claude.messages.create(model=model, max_tokens=10, extra_body={"temperature": 1.0, "top_k": 1}, messages=HELLO).content[0].text
    assert top1 == greedy
    nucleus = claude.messages.create(model=model, max_tokens=10, extra_body={"temperature": 1.0, "top_p": 1e-6}, messages=HELLO).content[0].text
    assert nucleus == greedy


def test_system_blocks_and_assistant_prefill(claude, model):
    a = claude.messages.create(model=model, max_tokens=8, extra_body={"temperature": 0}, system="Answer briefly.", messages=HELLO)
    b = claude.messages.create(model=model, max_tokens=8, extra_body={"temperature": 0},
                               system=[{"type": "text", "text": "Answer briefly."}], messages=HELLO)
    assert a.content[0].text == b.content[0].text
    # A final assistant message is continued, not answered.
    prefill = "The three colors are"
    c = claude.messages.create(model=model, max_tokens=8, extra_body={"temperature": 0},
                               messages=HELLO + [{"role": "assistant", "content": prefill}])
    plain = claude.messages.create(model=model, max_tokens=8, extra_body={"temperature": 0}, messages=HELLO)
    assert c.content[0].text != plain.content[0].text


def test_errors_use_anthropic_shape(router, model):
    r = httpx.post(f"{router.url}/v1/messages", json={"model": model, "messages": HELLO})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    r = httpx.post(f"{router.url}/v1/messages", json={"model": model, "max_tokens": 5, "temperature": 1.5, "messages": HELLO})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(f"{router.url}/v1/messages", json={"model": model, "max_tokens": 5,
                   "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["error"]["message"]
    r = httpx.post(f"{router.url}/v1/messages", json={"model": "missing", "max_tokens": 5, "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
