"""`deepseek-mcp --transport http` (and sse) as real subprocesses on loopback ports, driven by the SDK client."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jsonschema
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.anyio
SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists():
    pytest.skip("console script deepseek-mcp not installed (pip install -e .)", allow_module_level=True)
TOKEN = "test-token-" + os.urandom(6).hex()
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def server_process(tmp_path: Path, *args: str, token: str | None = TOKEN) -> AsyncIterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    if token:
        env["DEEPSEEK_MCP_TOKEN"] = token
    log = (tmp_path / f"server-{port}.log").open("wb")
    proc = await anyio.open_process([str(SCRIPT), "--port", str(port), "--max-tokens", "2", "--temperature", "0",
                                     *args], env=env, stdout=log, stderr=log)
    try:
        with anyio.fail_after(60):
            while True:
                assert proc.returncode is None, (tmp_path / f"server-{port}.log").read_text()
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        with anyio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    text = (tmp_path / f"server-{port}.log").read_text()
    assert "Traceback" not in text, text


@pytest.fixture(scope="module")
async def http_port(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[int]:
    async with server_process(tmp_path_factory.mktemp("http"), "--transport", "http") as port:
        yield port


def authed(token: str | None = TOKEN, **headers: str) -> httpx2.AsyncClient:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))


@asynccontextmanager
async def mcp_client(port: int, mode: str = "auto") -> AsyncIterator[Client]:
    async with authed() as http:
        transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


async def checked(client: Client, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    result = await client.call_tool(name, args, **kw)
    assert not result.is_error, result.content
    jsonschema.validate(result.structured_content, tools[name].output_schema)
    return result.structured_content


async def engine_stats(client: Client) -> dict[str, Any]:
    return (await checked(client, "list_models", {}))["models"][0]["stats"]


async def test_every_tool_with_progress(http_port: int) -> None:
    async with mcp_client(http_port) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"chat", "think", "tool_call", "list_models", "reset_conversation"}
        events: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            events.append(progress)

        chat = await checked(client, "chat", {"prompt": "Hello", "max_tokens": 16}, progress_callback=on_progress)
        assert chat["model"] == "deepseek-v3.1-demo (random weights)" and chat["usage"]["completion_tokens"] >= 1
        assert events and events == sorted(events)
        again = await checked(client, "chat", {"prompt": "More", "conversation_id": chat["conversation_id"]})
        assert again["usage"]["prompt_tokens"] > chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
        think = await checked(client, "think", {"prompt": "Why?", "max_tokens": 3, "thinking_budget": 1})
        assert think["reasoning_complete"] is True
        await checked(client, "tool_call", {"prompt": "Weather in Oslo?", "tools": [WEATHER], "tool_choice": "none"})
        info = (await checked(client, "list_models", {}))["models"][0]
        assert info["status"] == "ready" and info["kernels"] in ("torch", "triton")
        assert (await checked(client, "reset_conversation", {"conversation_id": chat["conversation_id"]}))[
            "removed_messages"] == 4
        bad = await client.call_tool("chat", {"prompt": "x", "conversation_id": chat["conversation_id"]})
        assert bad.is_error and "unknown conversation_id" in bad.content[0].text


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_cancel_frees_the_request(http_port: int, mode: str) -> None:
    async with mcp_client(http_port, mode) as client:
        started = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if progress >= 3:
                started.set()

        async with anyio.create_task_group() as tg:
            async def long_call() -> None:
                await client.call_tool("chat", {"prompt": "Talk", "max_tokens": 3000}, progress_callback=on_progress)
                raise AssertionError("the call was not cancelled")

            tg.start_soon(long_call)
            with anyio.fail_after(60):
                await started.wait()
            tg.cancel_scope.cancel()
        deadline = time.monotonic() + 5
        while True:
            stats = await engine_stats(client)
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["cache_usage"] == 0.0:
                break
            assert time.monotonic() < deadline, stats
            await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        assert (await engine_stats(client))["generated_tokens"] == stats["generated_tokens"]


async def test_twenty_concurrent_clients(http_port: int) -> None:
    answers: dict[int, dict[str, Any]] = {}

    async def one(i: int) -> None:
        async with mcp_client(http_port) as client:
            result = await client.call_tool("chat", {"prompt": f"Client {i} says hi", "max_tokens": 2})
            assert not result.is_error, result.content
            answers[i] = result.structured_content

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
    assert sorted(answers) == list(range(20))
    assert len({a["conversation_id"] for a in answers.values()}) == 20
    assert all(1 <= a["usage"]["completion_tokens"] <= 2 for a in answers.values())


async def test_origin_host_and_token_are_enforced(http_port: int) -> None:
    url = f"http://127.0.0.1:{http_port}/mcp"
    async with authed(token=None) as http:
        missing = await http.post(url, json=INIT, headers=MCP_HEADERS)
        assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
    async with authed(token="wrong-token") as http:
        assert (await http.post(url, json=INIT, headers=MCP_HEADERS)).status_code == 401
    async with authed(Origin="http://evil.example") as http:
        foreign = await http.post(url, json=INIT, headers=MCP_HEADERS)
        assert foreign.status_code == 403 and "Origin" in foreign.text
    async with authed(Host="evil.example") as http:
        assert (await http.post(url, json=INIT, headers=MCP_HEADERS)).status_code == 421
    async with authed(Origin=f"http://localhost:{http_port}") as http:
        ok = await http.post(url, json=INIT, headers=MCP_HEADERS)
        assert ok.status_code == 200, ok.text
    async with authed() as http:
        garbage = await http.post(url, content=b"{not json", headers=MCP_HEADERS)
        assert garbage.status_code == 400 and garbage.json()["error"]["code"] == -32700


async def test_sse_transport_without_token(tmp_path: Path) -> None:
    async with server_process(tmp_path, "--transport", "sse", token=None) as port:
        async with Client(sse_client(f"http://127.0.0.1:{port}/sse"), mode="legacy") as client:
            assert {t.name for t in (await client.list_tools()).tools} >= {"chat", "think", "tool_call"}
            out = await checked(client, "chat", {"prompt": "Hi over SSE"})
            assert out["usage"]["completion_tokens"] >= 1
        async with httpx2.AsyncClient(headers={"Origin": "http://evil.example"}) as http:
            async with http.stream("GET", f"http://127.0.0.1:{port}/sse") as response:
                assert response.status_code == 403
