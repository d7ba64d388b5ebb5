"""The installed `deepseek-mcp` console script as a real subprocess over stdio (demo model)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client, StdioServerParameters

pytestmark = pytest.mark.anyio
SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists():
    pytest.skip("console script deepseek-mcp not installed (pip install -e .)", allow_module_level=True)
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    return env  # keeps DEEPSEEK_MCP_CACHE (the session's demo checkpoint) and TRITON_INTERPRET from conftest


class RawPeer:
    """Line-level JSON-RPC over the process's pipes; every stdout line must be JSON-RPC."""

    def __init__(self, proc: Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.reader = BufferedByteReceiveStream(proc.stdout)
        self.seen: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any] | str) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        await self.proc.stdin.send((line + "\n").encode())  # type: ignore[union-attr]

    async def receive(self) -> dict[str, Any]:
        with anyio.fail_after(60):
            line = await self.reader.receive_until(b"\n", 1 << 24)
        message = json.loads(line)  # anything but JSON on stdout fails here
        assert message.get("jsonrpc") == "2.0", message
        self.seen.append(message)
        return message

    async def response(self, request_id: Any) -> dict[str, Any]:
        while True:
            message = await self.receive()
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message


async def test_raw_protocol_errors_progress_and_exit_on_stdin_close(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr.txt").open("wb")
    proc = await anyio.open_process([str(SCRIPT), "--max-tokens", "2", "--temperature", "0"], env=server_env(),
                                    stderr=stderr)
    try:
        peer = RawPeer(proc)
        await peer.send("{this is not json")
        assert (await peer.receive()) == {"jsonrpc": "2.0", "id": None,
                                          "error": {"code": -32700,
                                                    "message": "Parse error: the line is not valid JSON"}}
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        init = await peer.response(1)
        assert init["result"]["serverInfo"]["name"] == "deepseek-mcp" and "tools" in init["result"]["capabilities"]
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await peer.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        names = {t["name"] for t in (await peer.response(2))["result"]["tools"]}
        assert names == {"chat", "think", "tool_call", "list_models", "reset_conversation"}
        await peer.send({"jsonrpc": "2.0", "id": 3, "method": "no/such/method"})
        assert (await peer.response(3))["error"]["code"] == -32601
        await peer.send({"jsonrpc": "2.0", "id": 4, "method": 5})
        assert (await peer.response(4))["error"]["code"] == -32600
        await peer.send({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
            "name": "chat", "arguments": {"prompt": "hi"}, "_meta": {"progressToken": "tok-5"}}})
        result = (await peer.response(5))["result"]
        assert result["isError"] is False and result["structuredContent"]["usage"]["completion_tokens"] <= 2
        progress = [m["params"] for m in peer.seen if m.get("method") == "notifications/progress"]
        assert progress and all(p["progressToken"] == "tok-5" for p in progress)
        await peer.send({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
                         "params": {"name": "chat", "arguments": {"prompt": 5}}})
        bad = (await peer.response(6))["result"]
        assert bad["isError"] is True and "prompt" in bad["content"][0]["text"]
        await proc.stdin.aclose()  # type: ignore[union-attr]
        with anyio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()
    log = (tmp_path / "stderr.txt").read_text()
    assert "loading model demo" in log and "Traceback" not in log


async def test_sdk_client_over_stdio() -> None:
    params = StdioServerParameters(command=str(SCRIPT), args=["--max-tokens", "3", "--temperature", "0"],
                                   env=server_env())
    async with Client(params) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"chat", "think", "tool_call", "list_models", "reset_conversation"}

        async def ok(name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
            result = await client.call_tool(name, args, **kw)
            assert not result.is_error, result.content
            jsonschema.validate(result.structured_content, tools[name].output_schema)
            return result.structured_content

        events: list[tuple[float, float, float | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            events.append((time.monotonic(), progress, total))

        chat = await ok("chat", {"prompt": "Hello", "max_tokens": 24}, progress_callback=on_progress)
        assert chat["model"] == "deepseek-v3.1-demo (random weights)"
        assert events and [p for _, p, _ in events] == sorted(p for _, p, _ in events)
        assert events[-1][2] == 24
        think = await ok("think", {"prompt": "2+2?", "max_tokens": 3, "thinking_budget": 1})
        assert think["reasoning_complete"] is True
        calls = await ok("tool_call", {"prompt": "Weather?", "tools": [WEATHER], "tool_choice": "required",
                                       "max_tokens": 40})
        assert calls["tool_calls"] and {c["name"] for c in calls["tool_calls"]} == {"get_weather"}
        assert calls["invalid_tool_calls"] == [] and all("city" in c["arguments"] for c in calls["tool_calls"])
        reset = await ok("reset_conversation", {"conversation_id": chat["conversation_id"]})
        assert reset["removed_messages"] == 2

        started = anyio.Event()

        async def on_tokens(progress: float, total: float | None, message: str | None) -> None:
            if progress >= 3:
                started.set()

        async with anyio.create_task_group() as tg:
            async def long_call() -> None:
                await client.call_tool("chat", {"prompt": "Go on forever", "max_tokens": 3000},
                                       progress_callback=on_tokens)
                raise AssertionError("the call was not cancelled")

            tg.start_soon(long_call)
            with anyio.fail_after(60):
                await started.wait()
            tg.cancel_scope.cancel()
        deadline = time.monotonic() + 5
        while True:
            stats = (await ok("list_models", {}))["models"][0]["stats"]
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["cache_usage"] == 0.0:
                break
            assert time.monotonic() < deadline, stats
            await anyio.sleep(0.05)
        generated = stats["generated_tokens"]
        assert generated < 24 + 3 + 3 + 3000  # the long call stopped early
        await anyio.sleep(0.3)
        assert (await ok("list_models", {}))["models"][0]["stats"]["generated_tokens"] == generated


async def test_sigterm_during_a_tool_call_answers_it_and_exits_in_time(tmp_path: Path) -> None:
    """SIGTERM with a long tool call (3000 tokens) and a short one (2 tokens) under way, a grace of 2 s (the default
    is 1 s; 2 s keeps the short call's finish within it on a loaded CI machine): the short call finishes within
    the grace, the long one ends with an error result saying the server is shutting down, a call sent after the
    signal is refused the same way at once; the process exits with 143 within the grace plus 1 s, stdout holds
    only whole JSON-RPC messages up to EOF, stderr one line for the aborted call and no traceback."""
    stderr_path = tmp_path / "stderr.txt"
    stderr = stderr_path.open("wb")
    grace = 2.0
    proc = await anyio.open_process([str(SCRIPT), "--temperature", "0", "--shutdown-grace", str(grace)],
                                    env=server_env(), stderr=stderr)

    def call(request_id: int, max_tokens: int) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {
            "name": "chat", "arguments": {"prompt": "hi", "max_tokens": max_tokens},
            "_meta": {"progressToken": f"p{request_id}"}}}

    try:
        peer = RawPeer(proc)
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        await peer.response(1)
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await peer.send(call(2, 3000))
        while not any(m.get("method") == "notifications/progress" and m["params"]["progressToken"] == "p2"
                      and m["params"].get("message", "").startswith("generated ") for m in peer.seen):
            await peer.receive()  # the long call is generating
        await peer.send(call(3, 2))
        while not any(m.get("method") == "notifications/progress" and m["params"]["progressToken"] == "p3"
                      for m in peer.seen):
            await peer.receive()  # the short call is under way
        before_signal = len(peer.seen)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            while "SIGTERM received" not in stderr_path.read_text():
                await anyio.sleep(0.01)
        await peer.send(call(4, 3))  # within the grace period: refused
        with anyio.fail_after(10):
            while True:  # everything up to EOF: whole JSON-RPC lines (receive() asserts it)
                try:
                    await peer.receive()
                except anyio.IncompleteRead:  # EOF
                    break
            assert peer.reader.buffer == b"", peer.reader.buffer  # no partial line before EOF
            code = await proc.wait()
        took = time.monotonic() - sent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()
    log = stderr_path.read_text()
    answers = {m["id"]: m["result"] for m in peer.seen if "result" in m}
    print(f"SIGTERM to exit over stdio: {took:.2f} s")
    assert code == 143 and took < grace + 1.0, (code, took, log[-3000:])
    assert "Traceback" not in log and "ERROR" not in log, log[-5000:]
    assert not [m for m in peer.seen[:before_signal] if m.get("id") == 3]  # answered after the signal
    assert answers[3]["isError"] is False, (answers[3], log[-3000:])
    assert answers[3]["structuredContent"]["usage"]["completion_tokens"] == 2
    for i in (2, 4):
        assert answers[i]["isError"] is True and "shutting down" in answers[i]["content"][0]["text"], answers[i]
    assert log.count("stopping: aborted chat (MCP tool call)") == 1, log[-3000:]
