"""kiln as an MCP client: a router started with --mcp-config connects to MCP servers written
with the official `mcp` SDK (tests/api/mcp_tool_server.py, over stdio and streamable HTTP) and
to broken ones (one exits at once, one writes garbage, one hangs). Requests that opt in with
`"mcp"` (chat), `mcp_servers` (messages) or `mcp` tools (responses) get the servers' tools; the
model is tiny, so calls are forced with `tool_choice`, and the tests check the server's own log
of what it received, that the result reached the final answer, and that failures of every
kind leave the router serving."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx2 as httpx
import openai
import pytest

from conftest import BIN, Process, Router, free_port, wait_until

SERVER = Path(__file__).resolve().parent / "mcp_tool_server.py"
PY = sys.executable


def force(name):
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def env(tmp_path_factory, worker):
    d = tmp_path_factory.mktemp("mcp-client")
    log = d / "calls.jsonl"
    log.touch()
    port = free_port()
    http_server = Process([PY, str(SERVER), str(log), "http", str(port)], "mcp-http-tools")
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/mcp").status_code > 0, 60, "the MCP HTTP server")
    config = {"mcpServers": {
        "notes": {"command": PY, "args": [str(SERVER), str(log), "stdio"]},
        "web": {"type": "http", "url": f"http://127.0.0.1:{port}/mcp", "headers": {"X-Test-Token": "s3cret"}},
        "exits": {"command": PY, "args": ["-c", "import sys; sys.exit(3)"]},
        "garbage": {"command": PY, "args": ["-c", "import time\nwhile True:\n    print('this is not JSON-RPC', flush=True)\n    time.sleep(0.1)"]},
        "hangs": {"command": PY, "args": ["-c", "import time; time.sleep(3600)"]},
        "off": {"command": "/nonexistent", "disabled": True},
    }}
    path = d / "mcp.json"
    path.write_text(json.dumps(config))
    router = Router("mcp-client", [worker.grpc], "--mcp-config", str(path), "--mcp-connect-timeout-secs", "3",
                    "--mcp-call-timeout-secs", "3", "--max-tool-rounds", "1")
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = anthropic.Anthropic(base_url=router.url, api_key="unused", max_retries=0, timeout=120)
    yield SimpleNamespace(router=router, log=log, client=client, messages=messages, web_url=f"http://127.0.0.1:{port}/mcp")
    router.stop()
    http_server.stop()


def received(env, tool):
    return [c for c in map(json.loads, env.log.read_text().splitlines()) if c["tool"] == tool]


def health_lines(env):
    r = httpx.get(f"{env.router.url}/health")
    assert r.status_code == 200, r.text
    return {line.split(":")[0]: line for line in r.text.splitlines() if line.startswith("mcp ")}


def metric(env, name, server):
    """The value of a series of `server`; 0 while the series does not exist yet."""
    text = httpx.get(f"{env.router.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(f'{name}{{server="{server}"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_broken_servers_are_reported_and_the_router_keeps_serving(env, model):
    lines = health_lines(env)
    assert set(lines) == {"mcp notes", "mcp web", "mcp exits", "mcp garbage", "mcp hangs"}, lines
    assert lines["mcp notes"] == "mcp notes: ready, 5 tools"
    assert lines["mcp web"] == "mcp web: ready, 5 tools"
    assert "down for" in lines["mcp exits"] and "handshake failed" in lines["mcp exits"], lines
    assert "down for" in lines["mcp garbage"], lines
    assert "down for" in lines["mcp hangs"] and "did not finish connecting within 3 s" in lines["mcp hangs"], lines
    assert metric(env, "kiln_router_mcp_server_up", "notes") == 1 and metric(env, "kiln_router_mcp_server_tools", "web") == 5
    text = httpx.get(f"{env.router.url}/metrics").text
    for broken in ("exits", "garbage", "hangs"):
        assert f'kiln_router_mcp_server_up{{server="{broken}"}} 0' in text, text
    # Reconnected with backoff: failures keep being counted while the server stays broken.
    wait_until(lambda: metric(env, "kiln_router_mcp_connect_failures_total", "exits") >= 4, 30, "reconnection attempts")
    # A server's stderr is in the router's log under its name, and each failure is logged.
    log = env.router.log_text()
    assert "kiln-test-tools ready on stdio" in log
    for broken in ("exits", "garbage", "hangs"):
        assert any("MCP server unavailable" in line and f"mcp_server={broken}" in line for line in log.splitlines()), broken
    # Plain requests and requests using every connected server are served meanwhile.
    plain = env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert plain.choices[0].message.content and "mcp" not in (plain.model_extra or {})
    every = env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
                                               tool_choice="none", extra_body={"mcp": True})
    assert every.model_extra["mcp"] == {"rounds": 0, "messages": []}
    # Naming a server that is down is refused with why.
    with pytest.raises(openai.APIStatusError) as e:
        env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], extra_body={"mcp": ["exits"]})
    assert e.value.status_code == 503 and "the MCP server `exits` is not connected" in e.value.message


def test_forced_stdio_call_reaches_the_server_and_its_result_the_answer(env, model):
    question = [{"role": "user", "content": "Please record the word apple in the archive."}]
    before = len(received(env, "record"))
    r = env.client.chat.completions.create(model=model, messages=question, tool_choice=force("notes__record"), temperature=0, max_tokens=40,
                                           extra_body={"mcp": ["notes"]})
    mcp = r.model_extra["mcp"]
    assert mcp["rounds"] == 1
    call, result = mcp["messages"]
    args = json.loads(call["tool_calls"][0]["function"]["arguments"])
    assert call["tool_calls"][0]["function"]["name"] == "notes__record" and set(args) == {"word"}
    # The server really received the call, with the model's arguments.
    calls = received(env, "record")
    assert len(calls) == before + 1 and calls[-1]["word"] == args["word"]
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": f"Recorded '{args['word']}'. The archive code is 7316."}
    # The final answer is the model's answer to the conversation with the call and its
    # result, as a client would send it, and it uses the result.
    answer = r.choices[0].message.content
    plain = env.client.chat.completions.create(model=model, messages=question + mcp["messages"], temperature=0, max_tokens=40)
    assert answer == plain.choices[0].message.content
    assert "7316" in answer
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens and r.usage.completion_tokens > plain.usage.completion_tokens


def test_streamed_http_call_shows_the_call_and_result_events(env, model):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = dict(model=model, messages=question, tool_choice=force("web__weather"), temperature=0, max_tokens=30, extra_body={"mcp": ["web"]})
    events, text, order, finish = [], "", [], None
    for chunk in env.client.chat.completions.create(stream=True, **request):
        if (chunk.model_extra or {}).get("mcp"):
            events.append(chunk.model_extra["mcp"])
            order.append(chunk.model_extra["mcp"]["type"])
            assert chunk.choices == []
        for c in chunk.choices:
            if c.delta.content:
                text += c.delta.content
                order.append("content")
            finish = c.finish_reason or finish
    call, result = events
    assert call["type"] == "tool_call" and call["server"] == "web" and call["round"] == 1
    city = json.loads(call["call"]["function"]["arguments"])["city"]
    assert result == {"type": "tool_result", "round": 1, "server": "web", "tool_call_id": call["call"]["id"],
                      "content": f"It is 21 degrees and sunny in {city}.", "is_error": False}
    assert order[:2] == ["tool_call", "tool_result"] and set(order[2:]) == {"content"}
    # The server got the call, with the configured headers.
    assert received(env, "weather")[-1] == {"tool": "weather", "pid": received(env, "weather")[-1]["pid"], "city": city, "token": "s3cret"}
    whole = env.client.chat.completions.create(**request)
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason


def test_tool_errors_and_timeouts_are_results_for_the_model(env, model):
    def result_of(tool, prompt):
        r = env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], tool_choice=force(f"notes__{tool}"),
                                               temperature=0, max_tokens=60, extra_body={"mcp": ["notes"]})
        assert r.choices[0].message.content is not None
        return r.model_extra["mcp"]["messages"][1]["content"]

    assert result_of("fail", "Fail because the disk is full.").startswith("Error: ")
    assert "the archive is locked" in result_of("fail", "Fail because the disk is full.")
    # Only the call timeout writes this result (the tool itself sleeps 60 s).
    assert result_of("slow", "Wait for 5 seconds.") == "Error: the tool did not answer within 3 s"
    assert received(env, "slow"), "the slow tool was called"
    assert health_lines(env)["mcp notes"] == "mcp notes: ready, 5 tools"
    assert metric(env, "kiln_router_mcp_tool_calls_total", "notes") > 0
    assert 'outcome="timeout"' in httpx.get(f"{env.router.url}/metrics").text
    # The MCP metrics pass Prometheus's own lint.
    out = subprocess.run(["promtool", "check", "metrics"], input=httpx.get(f"{env.router.url}/metrics").text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_a_server_that_dies_is_reconnected(env, model):
    old = received(env, "record")[-1]["pid"] if received(env, "record") else None
    r = env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Crash."}], tool_choice=force("notes__crash"),
                                           temperature=0, max_tokens=30, extra_body={"mcp": ["notes"]})
    assert r.model_extra["mcp"]["messages"][1]["content"].startswith("Error: ")
    wait_until(lambda: health_lines(env)["mcp notes"] == "mcp notes: ready, 5 tools" and metric(env, "kiln_router_mcp_connect_failures_total", "notes") >= 1,
               30, "the notes server to be reconnected")
    env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Record the word pear."}], tool_choice=force("notes__record"),
                                       temperature=0, max_tokens=40, extra_body={"mcp": ["notes"]})
    assert received(env, "record")[-1]["pid"] != old


def test_client_tools_still_come_back_to_the_client(env, model):
    before = env.log.read_text()
    tools = [{"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}}]
    r = env.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=tools,
                                           tool_choice=force("get_time"), parallel_tool_calls=False, temperature=0, max_tokens=40, extra_body={"mcp": True})
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    assert "zone" in json.loads(r.choices[0].message.tool_calls[0].function.arguments)
    assert env.log.read_text() == before, "no MCP tool was called"


def test_bad_mcp_requests_are_refused_with_reasons(env, router, model):
    def error(url, body):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}], **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    assert "no MCP server `nope`; this router has notes, web, exits, garbage, hangs" in error(env.router.url, {"mcp": ["nope"]})
    assert "expected true or an array of MCP server names" in error(env.router.url, {"mcp": 7})
    assert "one completion" in error(env.router.url, {"mcp": True, "n": 2})
    clash = [{"type": "function", "function": {"name": "notes__record"}}]
    assert "also the name of an MCP tool" in error(env.router.url, {"mcp": ["notes"], "tools": clash})
    assert "has no MCP servers" in error(router.url, {"mcp": True})


@pytest.mark.parametrize("text, message", [
    ("{", "is not valid JSON"),
    ('{"servers": {}}', "has no `mcpServers` object"),
    ('{"mcpServers": {"x": {"url": "http://h", "command": "y"}}}', "server `x`: has both `command` and `url`"),
])
def test_a_bad_config_stops_the_router_with_a_clear_error(tmp_path, text, message):
    path = tmp_path / "mcp.json"
    path.write_text(text)
    p = subprocess.run([str(BIN / "kiln-router"), "--workers", "127.0.0.1:1", "--port", str(free_port()), "--mcp-config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and message in p.stderr and str(path) in p.stderr, p.stderr
    assert "panicked" not in p.stderr


# /v1/messages: the shape of Anthropic's MCP connector (`mcp_servers`, `mcp_tool_use` and
# `mcp_tool_result` blocks), through the official SDK's beta client.
BETAS = ["mcp-client-2025-04-04"]
# The SDK no longer takes `temperature` as a parameter.
GREEDY = {"temperature": 0}


def blocks(message):
    return [b.type for b in message.content]


def test_messages_call_a_server_and_return_its_blocks(env, model):
    question = [{"role": "user", "content": "Please record the word apple in the archive."}]
    before = len(received(env, "record"))
    r = env.messages.beta.messages.create(model=model, max_tokens=40, extra_body=GREEDY, messages=question, betas=BETAS,
                                          mcp_servers=[{"type": "url", "name": "notes"}], tool_choice={"type": "tool", "name": "notes__record"})
    assert blocks(r) == ["mcp_tool_use", "mcp_tool_result", "text"], r.content
    use, result, answer = r.content
    assert use.name == "record" and use.server_name == "notes" and set(use.input) == {"word"} and use.id.startswith("mcptoolu_")
    # The server really received the call, with the model's arguments.
    calls = received(env, "record")
    assert len(calls) == before + 1 and calls[-1]["word"] == use.input["word"]
    assert result.tool_use_id == use.id and result.is_error is False
    assert [c.text for c in result.content] == [f"Recorded '{use.input['word']}'. The archive code is 7316."]
    assert "7316" in answer.text and r.stop_reason in ("end_turn", "max_tokens")
    # A client continuing the conversation sends the blocks back: the model then reads the same
    # prompt as the loop's last round, so it gives the same answer.
    history = question + [{"role": "assistant", "content": [use.model_dump(exclude_none=True), result.model_dump(exclude_none=True)]}]
    plain = env.messages.messages.create(model=model, max_tokens=40, extra_body=GREEDY, messages=history)
    assert plain.content[0].text == answer.text
    assert r.usage.input_tokens > plain.usage.input_tokens and r.usage.output_tokens > plain.usage.output_tokens


def test_messages_stream_the_call_and_result_blocks(env, model):
    request = dict(model=model, max_tokens=30, extra_body=GREEDY, messages=[{"role": "user", "content": "What is the weather in Paris?"}], betas=BETAS,
                   mcp_servers=[{"type": "url", "name": "web", "url": env.web_url}], tool_choice={"type": "tool", "name": "web__weather"})
    starts = []
    with env.messages.beta.messages.stream(**request) as stream:
        for event in stream:
            if event.type == "content_block_start":
                starts.append(event.content_block.type)
        streamed = stream.get_final_message()
    assert starts == ["mcp_tool_use", "mcp_tool_result", "text"], starts
    use, result, text = streamed.content
    city = use.input["city"]
    assert use.name == "weather" and use.server_name == "web" and result.tool_use_id == use.id
    assert [c.text for c in result.content] == [f"It is 21 degrees and sunny in {city}."] and not result.is_error
    # The server got the call, with the configured headers (the client's request carried none).
    assert received(env, "weather")[-1]["token"] == "s3cret" and received(env, "weather")[-1]["city"] == city
    whole = env.messages.beta.messages.create(**request)
    assert blocks(whole) == ["mcp_tool_use", "mcp_tool_result", "text"]
    assert whole.content[0].input == use.input and whole.content[2].text == text.text
    assert whole.stop_reason == streamed.stop_reason and whole.usage.output_tokens == streamed.usage.output_tokens


def test_messages_take_kilns_mcp_field_and_return_client_calls(env, model):
    r = env.messages.messages.create(model=model, max_tokens=40, messages=[{"role": "user", "content": "Record the word plum."}],
                                     tool_choice={"type": "tool", "name": "notes__record"}, extra_body={"mcp": ["notes"], **GREEDY})
    assert blocks(r)[:2] == ["mcp_tool_use", "mcp_tool_result"] and r.content[0].server_name == "notes"
    before = env.log.read_text()
    tool = {"name": "get_time", "strict": True, "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}
    r = env.messages.beta.messages.create(model=model, max_tokens=80, extra_body=GREEDY, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                                          betas=BETAS, mcp_servers=[{"type": "url", "name": "notes"}], tools=[tool],
                                          tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use" and blocks(r) == ["tool_use"] and r.content[0].name == "get_time" and set(r.content[0].input) == {"zone"}
    assert r.content[0].id.startswith("toolu_")
    assert env.log.read_text() == before, "no MCP tool was called"


def count(env, model, **body):
    r = httpx.post(f"{env.router.url}/v1/messages/count_tokens", json={"model": model, "messages": [{"role": "user", "content": "Hi"}], **body})
    assert r.status_code == 200, r.text
    return r.json()["input_tokens"]


def test_messages_choose_among_a_servers_tools(env, model):
    notes = {"type": "url", "name": "notes"}
    every = count(env, model, mcp_servers=[notes])
    only_record = count(env, model, mcp_servers=[{**notes, "tool_configuration": {"allowed_tools": ["record"]}}])
    toolset = count(env, model, mcp_servers=[notes], tools=[{"type": "mcp_toolset", "mcp_server_name": "notes", "default_config": {"enabled": False},
                                                             "configs": {"record": {"enabled": True}}}])
    assert count(env, model) < only_record == toolset < every
    assert count(env, model, mcp_servers=[{**notes, "tool_configuration": {"enabled": False}}]) == count(env, model)


def test_bad_messages_mcp_requests_are_refused_with_reasons(env, router, model):
    def error(url, body):
        r = httpx.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    notes = {"type": "url", "name": "notes"}
    assert "no MCP server `nope`; this router has notes, web, exits, garbage, hangs" in error(env.router.url, {"mcp_servers": [{"type": "url", "name": "nope"}]})
    assert "`mcp_servers[0].url`: is not the URL of the router's MCP server `web`" in error(env.router.url, {"mcp_servers": [{"type": "url", "name": "web", "url": "https://elsewhere.example/mcp"}]})
    assert "`notes` is a local program" in error(env.router.url, {"mcp_servers": [{**notes, "url": "https://notes.example/mcp"}]})
    assert "`mcp_servers[0].authorization_token`: is not accepted" in error(env.router.url, {"mcp_servers": [{**notes, "authorization_token": "t"}]})
    assert "`notes` is given twice" in error(env.router.url, {"mcp_servers": [notes, notes]})
    assert "either `mcp` or `mcp_servers`" in error(env.router.url, {"mcp": True, "mcp_servers": [notes]})
    assert "needs its server in `mcp_servers`" in error(env.router.url, {"tools": [{"type": "mcp_toolset", "mcp_server_name": "notes"}]})
    assert "`web` is not one of `mcp_servers`" in error(env.router.url, {"mcp_servers": [notes], "tools": [{"type": "mcp_toolset", "mcp_server_name": "web"}]})
    assert "the MCP server `notes` has no tool `nope`" in error(env.router.url, {"mcp_servers": [{**notes, "tool_configuration": {"allowed_tools": ["nope"]}}]})
    assert "defer_loading`: is not supported" in error(env.router.url, {"mcp_servers": [notes], "tools": [
        {"type": "mcp_toolset", "mcp_server_name": "notes", "default_config": {"defer_loading": True}}]})
    # A tool the request leaves out cannot be chosen.
    assert "`notes__record` is not one of the tools" in error(env.router.url, {"mcp_servers": [{**notes, "tool_configuration": {"allowed_tools": ["fail"]}}],
                                                                                "tool_choice": {"type": "tool", "name": "notes__record"}})
    clash = [{"name": "notes__record", "input_schema": {"type": "object"}}]
    assert "also the name of an MCP tool" in error(env.router.url, {"mcp_servers": [notes], "tools": clash})
    assert "has no MCP servers" in error(router.url, {"mcp_servers": [notes]})
    assert "has no MCP servers" in error(router.url, {"mcp": True})
    r = httpx.post(f"{env.router.url}/v1/messages", json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], "mcp": ["exits"]})
    assert r.status_code == 503 and "the MCP server `exits` is not connected" in r.json()["error"]["message"], r.text


NOTES = {"type": "mcp", "server_label": "notes", "require_approval": "never"}


def item_types(response):
    return [i.type for i in response.output]


def test_responses_call_a_server_and_return_its_items(env, model):
    question = "Please record the word apple in the archive."
    before = len(received(env, "record"))
    r = env.client.responses.create(model=model, input=question, tools=[NOTES], tool_choice={"type": "mcp", "server_label": "notes", "name": "record"},
                                    temperature=0, max_output_tokens=40)
    assert item_types(r) == ["mcp_list_tools", "mcp_call", "message"], r.output
    listing, call, answer = r.output
    assert listing.server_label == "notes" and {t.name for t in listing.tools} == {"record", "fail", "slow", "crash", "weather"}
    assert next(t for t in listing.tools if t.name == "record").input_schema["required"] == ["word"]
    word = json.loads(call.arguments)["word"]
    assert call.name == "record" and call.server_label == "notes" and call.status == "completed" and call.error is None
    assert call.output == f"Recorded '{word}'. The archive code is 7316."
    # The server really received the call, with the model's arguments.
    calls = received(env, "record")
    assert len(calls) == before + 1 and calls[-1]["word"] == word
    assert "7316" in r.output_text and r.status in ("completed", "incomplete")
    assert [t["type"] for t in r.model_dump()["tools"]] == ["mcp"] and r.tool_choice.type == "mcp"
    # A client continuing the conversation passes the items back: the model then reads the
    # prompt of the loop's last round (no tool left to call: --max-tool-rounds 1), so it gives
    # the same answer, and the tools are not listed again.
    history = [{"role": "user", "content": question}, listing.model_dump(exclude_none=True), call.model_dump(exclude_none=True)]
    again = env.client.responses.create(model=model, input=history, tools=[NOTES], tool_choice="none", temperature=0, max_output_tokens=40)
    assert item_types(again) == ["message"] and again.output_text == r.output_text
    assert len(received(env, "record")) == before + 1
    assert r.usage.input_tokens > again.usage.input_tokens and r.usage.output_tokens > again.usage.output_tokens


def test_responses_stream_the_list_call_and_answer_events(env, model):
    request = dict(model=model, input="What is the weather in Paris?", temperature=0, max_output_tokens=30,
                   tools=[{"type": "mcp", "server_label": "web", "server_url": env.web_url, "allowed_tools": ["weather"], "require_approval": "never"}],
                   tool_choice={"type": "mcp", "server_label": "web", "name": "weather"})
    kinds = []
    for event in env.client.responses.create(stream=True, **request):
        kinds.append(event.type)
        if event.type in ("response.completed", "response.incomplete"):
            streamed = event.response
    assert [k for k in kinds if "output_text.delta" not in k] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed", "response.output_item.done",
        "response.output_item.added", "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
        "response.mcp_call.completed", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.done", "response.content_part.done", "response.output_item.done",
        streamed.status == "completed" and "response.completed" or "response.incomplete",
    ], kinds
    listing, call, _ = streamed.output
    city = json.loads(call.arguments)["city"]
    assert [t.name for t in listing.tools] == ["weather"]
    assert call.output == f"It is 21 degrees and sunny in {city}."
    # The server got the call, with the configured headers (the request carried none).
    assert received(env, "weather")[-1]["token"] == "s3cret" and received(env, "weather")[-1]["city"] == city
    whole = env.client.responses.create(**request)
    assert item_types(whole) == item_types(streamed) and whole.output[1].arguments == call.arguments
    assert whole.output_text == streamed.output_text and whole.usage.output_tokens == streamed.usage.output_tokens


def test_responses_tool_errors_are_failed_calls_and_client_calls_come_back(env, model):
    r = env.client.responses.create(model=model, input="Fail because the disk is full.", tools=[NOTES], temperature=0, max_output_tokens=40,
                                    tool_choice={"type": "mcp", "server_label": "notes", "name": "fail"})
    call = r.output[1]
    assert call.type == "mcp_call" and call.status == "failed" and call.output is None
    assert call.error.type == "mcp_tool_execution_error" and "the archive is locked" in call.error.content[0]["text"]
    before = env.log.read_text()
    tool = {"type": "function", "name": "get_time", "strict": True,
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}
    r = env.client.responses.create(model=model, input="What time is it in Tokyo?", tools=[NOTES, tool], tool_choice={"type": "function", "name": "get_time"},
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=40)
    assert item_types(r) == ["mcp_list_tools", "function_call"] and r.output[1].name == "get_time" and r.output[1].call_id.startswith("call_")
    assert set(json.loads(r.output[1].arguments)) == {"zone"}
    assert env.log.read_text() == before, "no MCP tool was called"


def test_bad_responses_mcp_requests_are_refused_with_reasons(env, router, model):
    def error(url, body):
        r = httpx.post(f"{url}/v1/responses", json={"model": model, "input": "Hi", "max_output_tokens": 8, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    assert "no MCP server `nope`; this router has notes, web, exits, garbage, hangs" in error(env.router.url, {"tools": [{**NOTES, "server_label": "nope"}]})
    assert "`tools[0].server_url`: is not the URL of the router's MCP server `web`" in error(
        env.router.url, {"tools": [{"type": "mcp", "server_label": "web", "server_url": "https://elsewhere.example/mcp"}]})
    assert "`notes` is a local program" in error(env.router.url, {"tools": [{**NOTES, "server_url": "https://notes.example/mcp"}]})
    assert "`tools[0].headers`: is not accepted" in error(env.router.url, {"tools": [{**NOTES, "headers": {"Authorization": "Bearer x"}}]})
    assert "`tools[0].authorization`: is not accepted" in error(env.router.url, {"tools": [{**NOTES, "authorization": "t"}]})
    assert "`tools[0].require_approval`: only `never` is supported" in error(env.router.url, {"tools": [{**NOTES, "require_approval": "always"}]})
    assert "only `never` is supported" in error(env.router.url, {"tools": [{**NOTES, "require_approval": {"always": {"tool_names": ["record"]}}}]})
    assert "`notes` is given twice" in error(env.router.url, {"tools": [NOTES, NOTES]})
    assert "the MCP server `notes` has no tool `nope`" in error(env.router.url, {"tools": [{**NOTES, "allowed_tools": ["nope"]}]})
    assert "`tools[0].allowed_tools.read_only`: is not supported" in error(env.router.url, {"tools": [{**NOTES, "allowed_tools": {"read_only": True}}]})
    assert "`record` is not a tool of an MCP server" in error(env.router.url, {"tools": [{**NOTES, "allowed_tools": ["fail"]}],
                                                                                "tool_choice": {"type": "mcp", "server_label": "notes", "name": "record"}})
    assert "also the name of an MCP tool" in error(env.router.url, {"tools": [NOTES, {"type": "function", "name": "notes__record"}]})
    assert "log-probabilities are not returned" in error(env.router.url, {"tools": [NOTES], "include": ["message.output_text.logprobs"]})
    assert "approval items are not supported: kiln asks no approval" in error(env.router.url, {"tools": [NOTES], "input": [
        {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}]})
    assert "needs its output or error" in error(env.router.url, {"tools": [NOTES], "input": [
        {"role": "user", "content": "Hi"}, {"type": "mcp_call", "id": "mcp_1", "server_label": "notes", "name": "record", "arguments": "{}"}]})
    assert "has no MCP servers" in error(router.url, {"tools": [NOTES]})
    r = httpx.post(f"{env.router.url}/v1/responses", json={"model": model, "input": "Hi", "tools": [{"type": "mcp", "server_label": "exits"}]})
    assert r.status_code == 503 and "the MCP server `exits` is not connected" in r.json()["error"]["message"], r.text


def test_responses_max_tool_calls_caps_the_calls_the_router_makes(tmp_path, worker, model):
    log = tmp_path / "calls.jsonl"
    log.touch()
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"notes": {"command": PY, "args": [str(SERVER), str(log), "stdio"]}}}))
    router = Router("mcp-calls", [worker.grpc], "--mcp-config", str(config), "--max-tool-rounds", "4")
    try:
        body = {"model": model, "input": "Please record the word apple in the archive.", "tools": [NOTES], "temperature": 0, "max_output_tokens": 60,
                "tool_choice": {"type": "mcp", "server_label": "notes", "name": "record"}}

        def calls(**extra):
            r = httpx.post(f"{router.url}/v1/responses", json={**body, **extra}, timeout=300)
            assert r.status_code == 200, r.text
            return [i for i in r.json()["output"] if i["type"] == "mcp_call"]

        # Left to itself, this model calls the tool again in every round it may.
        assert len(calls()) == 4 and len(log.read_text().splitlines()) == 4
        capped = calls(max_tool_calls=2)
        assert len(capped) == 2 and all(c["status"] == "completed" for c in capped)
        assert len(log.read_text().splitlines()) == 6
    finally:
        router.stop()


def test_an_agents_sdk_agent_uses_a_hosted_mcp_tool(env, model):
    """OpenAI's Agents SDK with a HostedMCPTool: the router lists and calls the server's tool
    and the agent gets the answer, the list and the call as its run's items."""
    import asyncio
    from agents import Agent, HostedMCPTool, ModelSettings, Runner, set_tracing_disabled
    from agents.model_settings import MCPToolChoice
    from agents.models.openai_responses import OpenAIResponsesModel

    set_tracing_disabled(True)
    before = len(received(env, "record"))

    async def run():
        llm = OpenAIResponsesModel(model=model, openai_client=openai.AsyncOpenAI(base_url=f"{env.router.url}/v1", api_key="unused", max_retries=0))
        agent = Agent(name="archivist", instructions="Use the archive tools.", model=llm, tools=[HostedMCPTool(tool_config=NOTES)],
                      model_settings=ModelSettings(temperature=0, max_tokens=40, tool_choice=MCPToolChoice(server_label="notes", name="record")))
        return await Runner.run(agent, "Please record the word apple in the archive.", max_turns=1)

    result = asyncio.run(run())
    kinds = [item.type for item in result.new_items]
    assert kinds == ["mcp_list_tools_item", "tool_call_item", "message_output_item"], kinds
    call = result.new_items[1].raw_item
    assert call.type == "mcp_call" and call.name == "record" and "7316" in call.output
    assert len(received(env, "record")) == before + 1 and "7316" in result.final_output
