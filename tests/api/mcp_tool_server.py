"""An MCP server for the router's MCP-client tests, written with the official `mcp` SDK's
MCPServer (FastMCP). Every call is appended to a JSON-lines log, so a test can see what the
server really received.

    mcp_tool_server.py LOG stdio
    mcp_tool_server.py LOG http PORT
"""
import json
import os
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

LOG, TRANSPORT = sys.argv[1], sys.argv[2]
server = MCPServer("kiln-test-tools")


def record_call(tool, **args):
    with open(LOG, "a") as f:
        f.write(json.dumps({"tool": tool, "pid": os.getpid(), **args}) + "\n")


@server.tool()
def record(word: str) -> str:
    """Records a word in the archive."""
    record_call("record", word=word)
    return f"Recorded '{word}'. The archive code is 7316."


@server.tool()
def fail(reason: str) -> str:
    """Always fails."""
    record_call("fail", reason=reason)
    raise ToolError("the archive is locked")


@server.tool()
async def slow(seconds: int) -> str:
    """Takes a long time."""
    record_call("slow", seconds=seconds)
    await anyio.sleep(60)
    return "finally"


@server.tool()
def crash() -> str:
    """Ends the server's process."""
    record_call("crash")
    os._exit(1)


@server.tool()
def weather(city: str, ctx: Context) -> str:
    """The weather in a city."""
    headers = ctx.headers or {}
    record_call("weather", city=city, token=headers.get("x-test-token"))
    return f"It is 21 degrees and sunny in {city}."


if TRANSPORT == "stdio":
    # Something on stderr, which the router logs under the server's name.
    print("kiln-test-tools ready on stdio", file=sys.stderr, flush=True)
    server.run()
else:
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[3]))
