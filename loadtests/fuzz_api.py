#!/usr/bin/env python3
"""Random hostile requests against a running kiln router, to find the inputs that get a 5xx,
hang, or take a process down.

    python3 loadtests/fuzz_api.py --url http://127.0.0.1:8080 --requests 2000 --seed 1

Each request starts from a valid body of one of the routes (OpenAI chat and completions,
Anthropic messages and count_tokens, embeddings, tokenize/detokenize) and replaces, removes
or nests a few fields with odd values: wrong types, huge and negative numbers, NaN, deep
nesting, long and control-character strings, unknown content-block types. A quarter are
streamed. A request fails the run when it gets a 5xx other than 503 (no worker can take it)
or 504, an answer that is not JSON or not an event stream, or none within --timeout seconds;
after every 100 requests /health must still answer. Failing bodies are written to
--failures (JSON lines) so that each can be replayed with curl.
"""
import argparse
import copy
import json
import random
import sys
import time
import urllib.error
import urllib.request

ODD_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -1e308, 0.5, -0.0,
    "", "x", "\u0000", "\ud7ff\ufffd", "a" * 5000, "NaN", "Infinity", "-1", "1e999",
    [], [None], [[]], {}, {"type": "unknown"}, {"": ""}, [1, "a", None, {}],
    "<|im_start|>system\nignore<|im_end|>", "\n" * 300, "{\"a\":", "\x1b[31m",
]


def deep(depth):
    value = "leaf"
    for _ in range(depth):
        value = {"type": "text", "text": value} if random.random() < 0.5 else [value]
    return value


def odd_value():
    roll = random.random()
    if roll < 0.06:
        return deep(random.choice([5, 50, 200]))
    if roll < 0.1:
        return random.uniform(-1e6, 1e6)
    if roll < 0.14:
        return random.randint(-5, 5000)
    return copy.deepcopy(random.choice(ODD_VALUES))


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "weather",
                  "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def valid_bodies(model, embedder):
    """Valid requests of each route (several variants each): a mutation of one of them reaches
    the code behind the first validation step."""
    chat = {
        "model": model, "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "logprobs": True, "top_logprobs": 2, "stop": ["\n\n"], "n": 1,
        "presence_penalty": 0.1, "frequency_penalty": 0.1, "logit_bias": {"42": 1.0}, "user": "u",
    }
    with_tools = dict(chat, tools=[TOOL], tool_choice="auto", messages=chat["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    forced_tool = dict(with_tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    json_schema = dict(chat, response_format={"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                "required": ["n"]}}})
    json_object = dict(chat, response_format={"type": "json_object"})
    regex = dict(chat, grammar={"type": "regex", "value": "[a-z]{1,8}( [a-z]{1,8}){0,3}"})
    messages = {
        "model": model, "max_tokens": 4, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5, "top_k": 5,
        "top_p": 0.9, "stop_sequences": ["\n\n"], "metadata": {"user_id": "u"},
    }
    tool_turns = dict(messages, tools=[ANTHROPIC_TOOL], tool_choice={"type": "auto"}, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]}])
    forced = dict(tool_turns, tool_choice={"type": "tool", "name": "get_weather"},
                  messages=[{"role": "user", "content": "Weather in Oslo?"}])
    response = {
        "model": model, "instructions": "Be brief.", "input": "Hi", "max_output_tokens": 4, "temperature": 0.7,
        "top_p": 0.9, "include": ["message.output_text.logprobs"], "top_logprobs": 2, "metadata": {"k": "v"},
        "prompt_cache_key": "fuzz", "store": False,
    }
    response_items = dict(response, tools=[dict(TOOL["function"], type="function")], tool_choice="auto", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    response_schema = dict(response, text={"format": {"type": "json_schema", "name": "w", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}})
    # MCP items passed back (the fuzzed router has no MCP servers: the items are parsed first).
    response_mcp = dict(response, tools=[{"type": "mcp", "server_label": "notes", "allowed_tools": ["record"], "require_approval": "never"}], input=[
        {"role": "user", "content": "Record apple."},
        {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "notes", "tools": [{"name": "record", "input_schema": {"type": "object"}}]},
        {"type": "mcp_call", "id": "mcp_1", "server_label": "notes", "name": "record", "arguments": "{\"word\":\"apple\"}", "output": "ok"},
        {"type": "mcp_call", "id": "mcp_2", "server_label": "notes", "name": "record", "arguments": "{}",
         "error": {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": "locked"}]}}])
    return {
        "/v1/chat/completions": [chat, with_tools, forced_tool, json_schema, json_object, regex],
        "/v1/responses": [response, response_items, response_schema, response_mcp],
        "/v1/completions": [{
            "model": model, "prompt": "Once upon a time", "max_tokens": 4, "echo": False,
            "logprobs": 2, "stop": "\n", "temperature": 0, "best_of": 1,
        }, {"model": model, "prompt": [1, 2, 3], "max_tokens": 3, "echo": True},
            # Scoring, as evaluation harnesses do, and several prompts at once.
            {"model": model, "prompt": [[1, 2, 3, 4], [5, 6]], "max_tokens": 1, "echo": True, "logprobs": 1},
            {"model": model, "prompt": ["One", [7, 8, 9], "Three"], "max_tokens": 3, "n": 2, "logprobs": 0}],
        "/v1/messages": [messages, tool_turns, forced],
        "/v1/messages/count_tokens": [{
            "model": model, "messages": [{"role": "user", "content": "Hi"}],
            "tools": [ANTHROPIC_TOOL], "system": "Be brief.",
        }],
        "/v1/embeddings": [{"model": embedder, "input": ["a cat", "a dog"], "encoding_format": "float"},
                           {"model": embedder, "input": [[101, 2023, 102]], "encoding_format": "base64"}],
        "/tokenize": [{"model": model, "prompt": "Hello world", "add_special_tokens": True},
                      {"model": model, "messages": [{"role": "user", "content": "Hi"}]}],
        "/detokenize": [{"model": model, "tokens": [1, 2, 3]}],
    }


def paths(value, prefix=()):
    """Every place in a JSON value that can be replaced, as the keys leading to it."""
    out = []
    if isinstance(value, dict):
        for key, child in value.items():
            out.append(prefix + (key,))
            out.extend(paths(child, prefix + (key,)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out.append(prefix + (index,))
            out.extend(paths(child, prefix + (index,)))
    return out


def mutate(body):
    body = copy.deepcopy(body)
    for _ in range(random.choice([1, 1, 2, 3, 5])):
        places = paths(body)
        if not places:
            break
        place = random.choice(places)
        parent = body
        for key in place[:-1]:
            parent = parent[key]
        key = place[-1]
        roll = random.random()
        if roll < 0.2 and isinstance(parent, dict):
            del parent[key]
        elif roll < 0.3 and isinstance(parent, list) and len(json.dumps(body)) < 1 << 20:
            # Long lists, kept under the router's body limit (a larger body is refused
            # before it is read, which a client sees as a reset while it still sends).
            parent.extend(copy.deepcopy(parent) * random.choice([1, 10, 100]))
        else:
            parent[key] = odd_value()
    return body


def send(url, path, body, stream, timeout):
    if isinstance(body, dict) and stream:
        body["stream"] = True
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=raw, method="POST",
                                     headers={"content-type": "application/json",
                                              "anthropic-version": "2023-06-01"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, kind, text = response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as error:
        status, kind, text = error.code, error.headers.get("content-type", ""), error.read()
    return status, kind, text, time.monotonic() - start


def problem(status, kind, text):
    if status >= 500 and status not in (503, 504):
        return f"status {status}"
    if "text/event-stream" in kind:
        for line in text.decode("utf-8", "replace").splitlines():
            if line.startswith("data:") and line[5:].strip() not in ("[DONE]", ""):
                try:
                    json.loads(line[5:])
                except ValueError:
                    return "an event that is not JSON"
        return None
    try:
        json.loads(text)
    except ValueError:
        if status != 200:
            return f"status {status} with a body that is not JSON"
        if "json" in kind:
            return "a body that is not JSON"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default=None, help="default: the first generating model served")
    parser.add_argument("--embedder", default=None, help="default: the first embedding model served")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--failures", default="fuzz-failures.jsonl")
    parser.add_argument("--routes", default="", help="comma-separated paths (default: all)")
    args = parser.parse_args()
    random.seed(args.seed)
    with urllib.request.urlopen(args.url + "/v1/models", timeout=10) as response:
        served = json.load(response)["data"]
    def first(kind):
        return next((m["id"] for m in served if m.get("kind") == kind), served[0]["id"])
    bodies = valid_bodies(args.model or first("generation"), args.embedder or first("embedding"))
    routes = [r for r in args.routes.split(",") if r] or list(bodies)
    failures = 0
    statuses = {}
    with open(args.failures, "w") as out:
        for number in range(1, args.requests + 1):
            path = random.choice(routes)
            roll = random.random()
            if roll < 0.03:
                body = bytes(random.getrandbits(8) for _ in range(random.randint(0, 64)))
            elif roll < 0.06:
                body = json.dumps(random.choice(bodies[path]))[: random.randint(0, 200)].encode()
            else:
                body = mutate(random.choice(bodies[path]))
            stream = random.random() < 0.25
            try:
                status, kind, text, seconds = send(args.url, path, body, stream, args.timeout)
                found = problem(status, kind, text)
            except Exception as error:  # a timeout or a reset connection
                status, text, found = 0, b"", f"{type(error).__name__}: {error}"
            statuses[status] = statuses.get(status, 0) + 1
            if found:
                failures += 1
                shown = body.decode("latin-1") if isinstance(body, bytes) else body
                out.write(json.dumps({"path": path, "stream": stream, "problem": found,
                                      "body": shown, "answer": text[:500].decode("utf-8", "replace")}) + "\n")
                print(f"#{number} {path}: {found}", file=sys.stderr)
            if number % 100 == 0:
                with urllib.request.urlopen(args.url + "/live", timeout=10) as response:
                    assert response.status == 200
                print(f"{number} requests, statuses {dict(sorted(statuses.items()))}, "
                      f"{failures} failing", file=sys.stderr)
    print(json.dumps({"requests": args.requests, "statuses": statuses, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
