"""`deepseek-mcp --tensor-parallel-size 2` as a real subprocess over stdio on CPU (gloo): chat, think and
tool_call answer with the greedy text of one rank; a worker killed mid-generation fails that call with an error
naming the rank, `list_models` then reports the model failed, and closing stdin leaves no process behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from test_mcp_stdio import WEATHER, server_env

pytestmark = pytest.mark.anyio
SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists():
    pytest.skip("console script deepseek-mcp not installed (pip install -e .)", allow_module_level=True)
ARGS = ["--temperature", "0", "--dtype", "float32", "--device", "cpu", "--cache-tokens", "4096"]
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("chat", {"prompt": "Hello there", "max_tokens": 12}),
    ("think", {"prompt": "2+2?", "max_tokens": 10, "thinking_budget": 4}),
    ("tool_call", {"prompt": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required", "max_tokens": 40}),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] != "Z":
            out[int(d.name)] = (int(stat[1]), cmd)
    return out


def _descendants(root: int) -> set[int]:
    procs, found, frontier = _procs(), set(), {root}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier} - found
        found |= frontier
    return found


def _server_and_workers() -> tuple[int, list[int]]:
    mine = _descendants(os.getpid())
    procs = _procs()
    servers = [p for p in mine if "deepseek-mcp" in procs[p][1] and procs[p][0] == os.getpid()]
    assert len(servers) == 1, servers
    workers = [p for p in mine if "deepseek_mcp.inference.engine.launch" in procs[p][1]]
    return servers[0], workers


def _texts(result: dict[str, Any]) -> tuple:
    return result.get("text"), result.get("reasoning"), [(c["name"], c["arguments"]) for c in
                                                         result.get("tool_calls") or []]


async def _answers(args: list[str]) -> list[tuple]:
    async with Client(StdioServerParameters(command=str(SCRIPT), args=ARGS + args, env=server_env())) as client:
        out = []
        for name, arguments in CALLS:
            result = await client.call_tool(name, arguments)
            assert not result.is_error, result.content
            out.append(_texts(result.structured_content))
        return out


@pytest.mark.slow
async def test_stdio_server_with_two_ranks_answers_like_one() -> None:
    with anyio.fail_after(240):
        one = await _answers([])
        two = await _answers(["--tensor-parallel-size", "2"])
    assert two == one
    assert one[2][2] and one[2][2][0][0] == "get_weather"


@pytest.mark.slow
async def test_killed_worker_fails_the_call_and_list_models_then_nothing_is_left() -> None:
    params = StdioServerParameters(command=str(SCRIPT), args=ARGS + ["--tensor-parallel-size", "2",
                                                                     "--dist-timeout", "20"], env=server_env())
    async with Client(params) as client:
        first = await client.call_tool("list_models", {})
        assert not first.is_error
        model = first.structured_content["models"][0]
        while model["status"] == "loading":
            await anyio.sleep(0.2)
            model = (await client.call_tool("list_models", {})).structured_content["models"][0]
        assert model["status"] == "ready" and "latent KV cache replicated" in model["device"]
        server, workers = _server_and_workers()
        assert len(workers) == 1
        killed = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if progress >= 3 and not killed.is_set():
                os.kill(workers[0], signal.SIGKILL)
                killed.set()

        t0 = time.monotonic()
        result = await client.call_tool("chat", {"prompt": "Go on", "max_tokens": 3000}, progress_callback=on_progress)
        assert killed.is_set() and time.monotonic() - t0 < 60
        assert result.is_error and "tensor-parallel rank 1" in result.content[0].text, result.content
        with anyio.fail_after(10):
            while True:
                model = (await client.call_tool("list_models", {})).structured_content["models"][0]
                if model["status"] == "failed":
                    break
                await anyio.sleep(0.1)
        assert "tensor-parallel rank 1" in model["error"]
        later = await client.call_tool("chat", {"prompt": "again", "max_tokens": 2})
        assert later.is_error and "tensor-parallel rank 1" in later.content[0].text
    deadline = time.monotonic() + 15
    while (server in _procs() or any(w in _procs() for w in workers)) and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    assert server not in _procs() and not [w for w in workers if w in _procs()]
