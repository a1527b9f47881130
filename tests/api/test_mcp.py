"""kiln as an MCP server, through the official `mcp` Python SDK over streamable HTTP at /mcp:
tools and resources are listed, `chat` and `complete` answer exactly what the HTTP API answers
for the same greedy request (with progress as tokens arrive), errors carry the API's wording
as tool errors, the router's API key applies, and cancelling a call frees the worker."""
import asyncio
import json
import subprocess

import httpx2 as httpx
import mcp
import pytest
from mcp.client.streamable_http import streamable_http_client

from conftest import BIN, Router, wait_until

HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]


def run(coro):
    return asyncio.run(coro)


def test_tools_resources_and_chat_equal_the_http_api(router, worker, model):
    async def go():
        async with mcp.Client(f"{router.url}/mcp") as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == {"chat", "complete", "list_models"}
            assert "messages" in tools["chat"].input_schema["required"]
            resources = (await c.list_resources()).resources
            assert [str(r.uri) for r in resources] == [f"kiln://models/{model}"]
            meta = json.loads((await c.read_resource(resources[0].uri)).contents[0].text)
            assert meta["id"] == model and meta["context_length"] > 0 and meta["workers"] == [worker.grpc]
            assert meta["weight_format"].startswith("Q4_1"), meta  # SmolLM2-135M-Instruct.Q4_1.gguf
            progress = []

            async def on_progress(done, total, message):
                progress.append((done, total))

            chat = await c.call_tool("chat", {"messages": HELLO, "temperature": 0, "max_tokens": 24}, progress_callback=on_progress)
            complete = await c.call_tool("complete", {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8})
            models = await c.call_tool("list_models", {})
            return chat, complete, models, progress

    chat, complete, models, progress = run(go())
    http_chat = httpx.post(f"{router.url}/v1/chat/completions", json={"model": model, "messages": HELLO, "temperature": 0, "max_tokens": 24}).json()
    http_complete = httpx.post(f"{router.url}/v1/completions", json={"model": model, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}).json()
    assert not chat.is_error and chat.content[0].text == http_chat["choices"][0]["message"]["content"]
    assert chat.structured_content["finish_reason"] == http_chat["choices"][0]["finish_reason"]
    assert complete.content[0].text == http_complete["choices"][0]["text"]
    assert [m["id"] for m in models.structured_content["models"]] == [model]
    # One notification per streamed piece, counting up to max_tokens.
    assert len(progress) >= 10 and progress[-1][1] == 24 and [p for p, _ in progress] == sorted(p for p, _ in progress)


def test_errors_are_tool_errors_in_the_apis_words(router, model):
    async def go():
        async with mcp.Client(f"{router.url}/mcp") as c:
            unknown = await c.call_tool("chat", {"model": "no-such-model", "messages": HELLO})
            long = await c.call_tool("complete", {"prompt": "word " * 5000, "max_tokens": 4})
            bad = await c.call_tool("chat", {"messages": HELLO, "temperature": 9})
            return unknown, long, bad

    unknown, long, bad = run(go())
    assert unknown.is_error and "model `no-such-model` does not exist" in unknown.content[0].text
    assert long.is_error and "context" in long.content[0].text
    assert bad.is_error and "temperature" in bad.content[0].text


def test_the_api_key_applies_to_mcp(worker, model):
    r = Router("mcp-keyed", [worker.grpc], "--api-key", "sekrit")
    try:
        refused = httpx.post(f"{r.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                             headers={"accept": "application/json, text/event-stream"})
        assert refused.status_code == 401

        async def go():
            async with httpx.AsyncClient(headers={"authorization": "Bearer sekrit"}) as http:
                async with streamable_http_client(f"{r.url}/mcp", http_client=http) as (read, write):
                    async with mcp.ClientSession(read, write) as session:
                        await session.initialize()
                        return await session.call_tool("chat", {"messages": HELLO, "temperature": 0, "max_tokens": 4})

        assert not run(go()).is_error
    finally:
        r.stop()


def test_cancelling_a_call_frees_the_workers_slot(router, worker, model):
    async def go():
        async with mcp.Client(f"{router.url}/mcp") as c:
            started = asyncio.Event()

            async def on_progress(done, total, message):
                started.set()

            call = asyncio.create_task(c.call_tool("chat", {"messages": HELLO, "max_tokens": 2000, "temperature": 1, "ignore_eos": True},
                                                   progress_callback=on_progress))
            await asyncio.wait_for(started.wait(), 60)
            assert worker.metric("kiln_worker_running_sequences") == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.sleep(0.5)

    run(go())
    wait_until(lambda: worker.metric("kiln_worker_running_sequences") == 0, 10, "the cancelled generation to end on the worker")


def kilnctl_mcp(router_url, *extra):
    return mcp.StdioServerParameters(command=str(BIN / "kilnctl"), args=["--router", router_url, *extra, "mcp"])


def test_kilnctl_mcp_serves_the_same_over_stdio(router, worker, model):
    """`kilnctl mcp` as a desktop host launches it: the same tools, resources and answers,
    progress under the host's own token, and a cancelled call frees the worker."""
    async def go():
        async with mcp.Client(kilnctl_mcp(router.url)) as c:
            assert {t.name for t in (await c.list_tools()).tools} == {"chat", "complete", "list_models"}
            resources = (await c.list_resources()).resources
            assert json.loads((await c.read_resource(resources[0].uri)).contents[0].text)["id"] == model
            progress = []

            async def on_progress(done, total, message):
                progress.append(done)

            chat = await c.call_tool("chat", {"messages": HELLO, "temperature": 0, "max_tokens": 24}, progress_callback=on_progress)
            unknown = await c.call_tool("chat", {"model": "no-such-model", "messages": HELLO})
            call = asyncio.create_task(c.call_tool("chat", {"messages": HELLO, "max_tokens": 2000, "temperature": 1, "ignore_eos": True}))
            for _ in range(300):
                await asyncio.sleep(0.1)
                if worker.metric("kiln_worker_running_sequences") == 1:
                    break
            assert worker.metric("kiln_worker_running_sequences") == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            return chat, unknown, progress

    chat, unknown, progress = run(go())
    http_chat = httpx.post(f"{router.url}/v1/chat/completions", json={"model": model, "messages": HELLO, "temperature": 0, "max_tokens": 24}).json()
    assert chat.content[0].text == http_chat["choices"][0]["message"]["content"]
    assert len(progress) >= 10 and progress == sorted(progress)
    assert unknown.is_error and "model `no-such-model` does not exist" in unknown.content[0].text
    wait_until(lambda: worker.metric("kiln_worker_running_sequences") == 0, 10, "the cancelled generation to end on the worker")


def test_kilnctl_mcp_passes_the_api_key(worker, model):
    r = Router("mcp-stdio-keyed", [worker.grpc], "--api-key", "sekrit")
    try:
        async def go(*extra):
            async with mcp.Client(kilnctl_mcp(r.url, *extra)) as c:
                return await c.call_tool("chat", {"messages": HELLO, "temperature": 0, "max_tokens": 4})

        assert not run(go("--api-key", "sekrit")).is_error
        # A wrong key: kilnctl says so and exits, instead of serving a host nothing.
        refused = subprocess.run([str(BIN / "kilnctl"), "--router", r.url, "--api-key", "wrong", "mcp"], input="", capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "401" in refused.stderr and "missing or invalid API key" in refused.stderr
    finally:
        r.stop()
