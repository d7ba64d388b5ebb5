"""The MCP tools end to end in process: SDK client -> MCPServer -> service -> real AsyncEngine on the demo model.

One demo Engine is loaded per module; each scenario runs its own ModelHost (and AsyncEngine) over it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import jsonschema
import pytest
import torch
from helpers import fresh_seed
from mcp import Client
from mcp.types import CallToolResult, Tool

from deepseek_mcp.inference.constrained.tool_ban import ToolBan
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.text.parse import parse
from deepseek_mcp.inference.text.template import render_ids
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.server import MODELS_URI, build_server
from deepseek_mcp.mcp_server.service import ChatService

pytestmark = pytest.mark.anyio
DEMO = "deepseek-v3.1-demo (random weights)"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(None)


def make_config(**limits: Any) -> ServerConfig:
    return ServerConfig(cache_tokens=4096, sampling=SamplingDefaults(temperature=0.0),
                        limits=Limits(**{"max_tokens": 4, "progress_interval_s": 0.2, **limits}))


@asynccontextmanager
async def serving(engine: Engine, config: ServerConfig | None = None, loader: Any = None,
                  mode: str = "auto") -> AsyncIterator[tuple[Client, ChatService]]:
    config = config or make_config()
    host = ModelHost(config, loader=loader or (lambda: engine))
    service = ChatService(host, config)
    async with host.running(), Client(build_server(service), mode=mode) as client:
        yield client, service


@pytest.fixture(scope="module")
async def served(engine: Engine) -> AsyncIterator[tuple[Client, ChatService]]:
    async with serving(engine) as pair:
        await pair[1].host.wait_ready()
        yield pair


@pytest.fixture(scope="module")
async def tools(served: tuple[Client, ChatService]) -> dict[str, Tool]:
    return {t.name: t for t in (await served[0].list_tools()).tools}


async def call(client: Client, tools: dict[str, Tool], name: str, args: dict[str, Any],
               **kw: Any) -> CallToolResult:
    """Call a tool; a success must match the tool's output schema and repeat the structure as JSON text."""
    result = await client.call_tool(name, args, **kw)
    if not result.is_error:
        jsonschema.validate(result.structured_content, tools[name].output_schema)
        assert json.loads(result.content[0].text) == result.structured_content
    return result


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    assert result.structured_content is None
    return result.content[0].text


class ForceTokens:
    """Test processor: makes the model emit `token_ids` then EOS, optionally slowly (per decode step)."""

    def __init__(self, token_ids: Sequence[int], eos_id: int, delay_s: float = 0.0) -> None:
        self.script = list(token_ids) + [eos_id]
        self.delay_s = delay_s

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)  # runs in the engine's worker thread, never on the event loop
        target = self.script[min(len(output_ids), len(self.script) - 1)]
        logits.fill_(float("-inf"))
        logits[target] = 0.0
        return logits


def forcing(engine: Engine, text: str, delay_s: float = 0.0) -> Any:
    ids = engine.tokenizer.encode(text)

    def factory(**_: Any) -> list[Any]:
        return [ForceTokens(ids, engine.tokenizer.eos_id, delay_s)]

    return factory


def calls_text(name: str, arguments: str) -> str:
    return (f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>"
            "<｜tool▁calls▁end｜>")


# ------------------------------------------------------------------------------------------------ listing


async def test_tools_are_described_with_schemas(tools: dict[str, Tool]) -> None:
    assert set(tools) == {"chat", "think", "tool_call", "list_models", "reset_conversation"}
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.annotations.open_world_hint is False
        assert tool.input_schema["type"] == "object" and tool.input_schema["additionalProperties"] is False
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        jsonschema.Draft202012Validator.check_schema(tool.output_schema)
    chat_in = tools["chat"].input_schema["properties"]
    assert {"prompt", "messages", "system", "max_tokens", "temperature", "top_p", "seed", "stop",
            "conversation_id"} <= set(chat_in)
    assert "thinking_budget" in tools["think"].input_schema["properties"]
    assert {"tools", "tool_choice"} <= set(tools["tool_call"].input_schema["properties"])
    assert set(tools["think"].output_schema["required"]) >= {"reasoning", "answer", "text", "finish_reason",
                                                              "usage", "conversation_id", "model"}


# ------------------------------------------------------------------------------------------------ tools


async def test_chat_matches_the_engine(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                       engine: Engine) -> None:
    client, _ = served
    result = await call(client, tools, "chat", {"prompt": "Say hello.", "max_tokens": 3})
    out = result.structured_content
    assert out["model"] == DEMO and out["conversation_id"].startswith("conv_")
    prompt_ids = render_ids([{"role": "user", "content": "Say hello."}], engine.tokenizer)
    ref = engine.generate([prompt_ids], SamplingParams(max_tokens=3))[0]  # greedy, like temperature 0 here
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ref.token_ids),
                            "total_tokens": len(prompt_ids) + len(ref.token_ids)}
    assert out["text"] == parse(ref.text).content
    assert out["finish_reason"] == ref.finish_reason


async def test_conversation_continues_and_resets(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                                 engine: Engine) -> None:
    client, _ = served
    first = (await call(client, tools, "chat", {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "Name a color."}],
        "system": "Be brief.", "max_tokens": 2})).structured_content
    cid = first["conversation_id"]
    second = (await call(client, tools, "chat", {"prompt": "Another?", "conversation_id": cid,
                                                 "max_tokens": 2})).structured_content
    assert second["conversation_id"] == cid
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."},
               {"role": "assistant", "content": first["text"]}, {"role": "user", "content": "Another?"}]
    assert second["usage"]["prompt_tokens"] == len(render_ids(history, engine.tokenizer))
    reset = await call(client, tools, "reset_conversation", {"conversation_id": cid})
    assert reset.structured_content == {"conversation_id": cid, "removed_messages": 6}
    again = await call(client, tools, "chat", {"prompt": "x", "conversation_id": cid})
    assert "unknown conversation_id" in error_text(again)


async def test_think_budget_closes_reasoning(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                             engine: Engine) -> None:
    client, _ = served
    out = (await call(client, tools, "think", {"prompt": "What is 2+2?", "max_tokens": 4,
                                               "thinking_budget": 1})).structured_content
    assert out["reasoning_complete"] is True and out["reasoning_tokens"] <= 2  # forced </think> at index <= 1
    assert out["answer"] == out["text"]
    assert out["usage"]["completion_tokens"] <= 4
    prompt_ids = render_ids([{"role": "user", "content": "What is 2+2?"}], engine.tokenizer, thinking=True)
    assert prompt_ids[-1] == engine.tokenizer.token_to_id("<think>")
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_tool_call_parses_valid_and_invalid_calls(served: tuple[Client, ChatService],
                                                        tools: dict[str, Tool], engine: Engine) -> None:
    client, service = served
    service.tool_call_processors = forcing(engine, calls_text("get_weather", '{"city": "Paris"}'))
    try:
        res = await call(client, tools, "tool_call", {"prompt": "Weather in Paris?", "tools": [WEATHER],
                                                      "tool_choice": "required", "max_tokens": 40})
        out = res.structured_content
        assert [(c["name"], c["arguments"]) for c in out["tool_calls"]] == [("get_weather", {"city": "Paris"})]
        assert out["tool_calls"][0]["id"].startswith("call_") and out["invalid_tool_calls"] == []
        assert out["finish_reason"] == "stop"
        # Continue with the tool's result: the stored history holds the assistant's call.
        cid, call_id = out["conversation_id"], out["tool_calls"][0]["id"]
        service.tool_call_processors = forcing(engine, "Sunny.")
        follow = (await call(client, tools, "tool_call", {
            "messages": [{"role": "tool", "content": "sunny, 21 C", "tool_call_id": call_id}],
            "conversation_id": cid, "tools": [WEATHER], "max_tokens": 20})).structured_content
        assert follow["text"] == "Sunny." and follow["tool_calls"] == []
        history = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"name": "get_weather", "arguments": {"city": "Paris"}}]},
                   {"role": "tool", "content": "sunny, 21 C"}]
        expected = render_ids(history, engine.tokenizer,
                              tools=[{"type": "function", "function": {"name": "get_weather",
                                                                       "description": WEATHER["description"],
                                                                       "parameters": WEATHER["inputSchema"]}}])
        assert follow["usage"]["prompt_tokens"] == len(expected)
        # Schema violations and unknown tools are reported, not dropped.
        service.tool_call_processors = forcing(engine, calls_text("get_weather", '{"town": 3}')
                                               + calls_text("launch", "{}"))
        out = (await call(client, tools, "tool_call", {"prompt": "?", "tools": [WEATHER],
                                                       "max_tokens": 60})).structured_content
        assert out["tool_calls"] == []
        bad = {c["name"]: c for c in out["invalid_tool_calls"]}
        assert "'city' is a required property" in bad["get_weather"]["error"]
        assert bad["get_weather"]["raw"] == '{"town": 3}'
        assert "launch" in bad and "unknown" in bad["launch"]["error"]
    finally:
        service.tool_call_processors = service.constraints


async def test_tool_choice_none_bans_the_call_token(engine: Engine) -> None:
    ban = ToolBan.for_tokenizer(engine.tokenizer)
    opener = engine.tokenizer.token_to_id("<｜tool▁calls▁begin｜>")
    assert opener in ban.token_ids
    logits = torch.randn(engine.config.vocab_size)
    logits[opener] = 100.0
    assert int(ban([], logits).argmax()) != opener and logits[opener] == float("-inf")
    assert ToolBan([3, 3, 1]).token_ids == [1, 3]


async def test_list_models_tool_and_resource(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                             engine: Engine) -> None:
    client, _ = served
    info = (await call(client, tools, "list_models", {})).structured_content["models"][0]
    assert info["model"] == DEMO and info["demo"] is True and info["status"] == "ready"
    assert info["kernels"] == engine.kernels in ("torch", "triton") and info["device"] == str(engine.device)
    assert info["architecture"]["num_layers"] == 4 and info["parameters"] > 10_000_000
    assert info["weight_bytes"] == engine.weight_bytes == sum(p.numel() * p.element_size()
                                                              for p in engine.model.parameters())
    assert info["cache_capacity_tokens"] == 4096 and info["context_tokens"] == 4096
    assert {"running", "waiting", "cache_usage"} <= set(info["stats"])
    resource = await client.read_resource(MODELS_URI)
    assert json.loads(resource.contents[0].text)["models"][0]["architecture"] == info["architecture"]


# --------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("chat", {}, "exactly one of `prompt`"),
    ("chat", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "you gave both"),
    ("chat", {"prompt": 3}, "prompt"),
    ("chat", {"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "'system', 'user', 'assistant' or 'tool'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "end `messages` with the turn to answer"),
    ("chat", {"messages": []}, "messages is empty"),
    ("chat", {"prompt": "a", "max_tokens": 0}, "greater than 0"),
    ("chat", {"prompt": "a", "max_tokens": 5000}, "use max_tokens <="),
    ("chat", {"prompt": "word " * 5000}, "shorten the prompt"),
    ("chat", {"prompt": "a", "conversation_id": "conv_nope"}, "unknown conversation_id 'conv_nope'"),
    ("chat", {"prompt": "a", "max_token": 3}, "Extra inputs are not permitted"),
    ("chat", {"prompt": "a", "stop": [""]}, "non-empty"),
    ("chat", {"prompt": "a", "temperature": -1}, "temperature"),
    ("think", {"prompt": "a", "max_tokens": 4, "thinking_budget": 4}, "lower thinking_budget"),
    ("tool_call", {"prompt": "a", "tools": []}, "at least 1 item"),
    ("tool_call", {"prompt": "a", "tools": [{"name": "t", "inputSchema": {"type": "object", "properties": 5}}]},
     "not valid JSON Schema"),
    ("tool_call", {"prompt": "a", "tools": [WEATHER], "tool_choice": {"name": "other"}}, "not among the tools"),
    ("tool_call", {"prompt": "a", "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ("reset_conversation", {"conversation_id": "conv_nope"}, "unknown conversation_id"),
]


@pytest.mark.parametrize(("tool", "args", "needle"), BAD_INPUTS, ids=[f"{t}-{i}" for i, (t, _, _) in
                                                                     enumerate(BAD_INPUTS)])
async def test_bad_input_is_an_error_result(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                            tool: str, args: dict[str, Any], needle: str) -> None:
    assert needle in error_text(await call(served[0], tools, tool, args))


async def test_server_still_serves_after_errors(served: tuple[Client, ChatService], tools: dict[str, Tool]) -> None:
    assert not (await call(served[0], tools, "chat", {"prompt": "still there?", "max_tokens": 1})).is_error
    stats = (await call(served[0], tools, "list_models", {})).structured_content["models"][0]["stats"]
    assert stats["running"] == 0 and stats["cache_usage"] == 0.0


# ------------------------------------------------------------------------ progress, time limit, cancel


async def test_progress_at_least_every_second(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                              engine: Engine) -> None:
    client, service = served
    events: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append((time.monotonic(), progress, total, message))

    service.tool_call_processors = forcing(engine, "one two three four five six", delay_s=0.25)
    try:
        start = time.monotonic()
        out = (await call(client, tools, "tool_call", {"prompt": "count", "tools": [WEATHER], "max_tokens": 12},
                          progress_callback=on_progress)).structured_content
        end = time.monotonic()
    finally:
        service.tool_call_processors = service.constraints
    assert out["text"] == "one two three four five six"
    assert len(events) >= 4
    values = [p for _, p, _, _ in events]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert all(total == 12 for _, _, total, _ in events)
    gaps = [b - a for a, b in zip([start] + [t for t, *_ in events], [t for t, *_ in events] + [end])]
    assert max(gaps) < 1.0, gaps
    assert any(m and "generated" in m for *_, m in events)


async def test_time_limit_returns_partial_text(engine: Engine) -> None:
    async with serving(engine, make_config(max_wall_time_s=0.8)) as (client, service):
        service.tool_call_processors = forcing(engine, " ".join(["word"] * 40), delay_s=0.2)
        out = (await client.call_tool("tool_call", {"prompt": "go", "tools": [WEATHER], "max_tokens": 40}))
        data = out.structured_content
        assert data["finish_reason"] == "time"
        assert 0 < data["usage"]["completion_tokens"] < 40 and data["text"].startswith("word")
        stats = service.host.aengine.stats()
        assert stats.running == 0 and stats.cache_usage == 0.0


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_cancel_stops_generation_and_frees_cache(engine: Engine, mode: str) -> None:
    async with serving(engine, mode=mode) as (client, service):
        service.tool_call_processors = forcing(engine, " ".join(["word"] * 200), delay_s=0.1)
        started = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if progress >= 2:
                started.set()

        async with anyio.create_task_group() as tg:
            async def run_call() -> None:
                await client.call_tool("tool_call", {"prompt": "go", "tools": [WEATHER], "max_tokens": 200},
                                       progress_callback=on_progress)
                raise AssertionError("the call was not cancelled")

            tg.start_soon(run_call)
            with anyio.fail_after(30):
                await started.wait()
            assert service.host.aengine.stats().running == 1
            tg.cancel_scope.cancel()
        cancelled_at = time.monotonic()
        while True:
            stats = service.host.aengine.stats()
            if stats.running == 0 and stats.waiting == 0 and stats.cache_usage == 0.0:
                break
            assert time.monotonic() - cancelled_at < 2.0, stats  # within a decode step or two (0.1 s each)
            await anyio.sleep(0.02)
        before = stats.generated_tokens
        await anyio.sleep(0.3)
        assert service.host.aengine.stats().generated_tokens == before  # nothing runs any more


async def test_concurrent_calls_share_the_engine(served: tuple[Client, ChatService], tools: dict[str, Tool]) -> None:
    results: dict[int, dict[str, Any]] = {}

    async def one(i: int) -> None:
        res = await call(served[0], tools, "chat", {"prompt": f"Number {i}", "max_tokens": 2})
        results[i] = res.structured_content

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert len(results) == 12 and len({r["conversation_id"] for r in results.values()}) == 12
    assert all(r["usage"]["completion_tokens"] >= 1 for r in results.values())


# ------------------------------------------------------------------------------------------ lifecycle


async def test_calls_wait_for_a_loading_model(engine: Engine) -> None:
    release = threading.Event()

    def slow_loader() -> Engine:
        release.wait(30)
        return engine

    async with serving(engine, loader=slow_loader) as (client, service):
        listed = await client.list_tools()  # answers while the model loads
        assert len(listed.tools) == 5
        info = (await client.call_tool("list_models", {})).structured_content["models"][0]
        assert info["status"] == "loading" and info["model"] == DEMO and info["architecture"] is None
        messages: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")
            if len(messages) == 2:
                release.set()

        with anyio.fail_after(30):
            res = await client.call_tool("chat", {"prompt": "hi", "max_tokens": 1}, progress_callback=on_progress)
        assert not res.is_error and res.structured_content["usage"]["completion_tokens"] == 1
        assert messages[0].startswith("loading model") and len(messages) >= 2
        assert service.host.status == "ready"


async def test_failed_load_is_reported_by_every_call(engine: Engine) -> None:
    def broken() -> Engine:
        raise FileNotFoundError("no safetensors files in /models/missing")

    async with serving(engine, loader=broken) as (client, _):
        for tool, args in [("chat", {"prompt": "hi"}), ("think", {"prompt": "hi"}),
                           ("tool_call", {"prompt": "hi", "tools": [WEATHER]})]:
            with anyio.fail_after(10):
                text = error_text(await client.call_tool(tool, args))
            assert "failed to load: FileNotFoundError: no safetensors files in /models/missing" in text
        info = (await client.call_tool("list_models", {})).structured_content["models"][0]
        assert info["status"] == "failed" and "no safetensors" in info["error"]


async def test_text_parts_render_like_a_string(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                               engine: Engine) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]
    out = (await call(served[0], tools, "chat", {"messages": [{"role": "user", "content": parts}],
                                                 "max_tokens": 1})).structured_content
    assert out["usage"]["prompt_tokens"] == len(render_ids([{"role": "user", "content": "Hi there"}],
                                                           engine.tokenizer))


class Explode:
    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("processor exploded")


async def test_engine_failure_is_an_error_result(served: tuple[Client, ChatService], tools: dict[str, Tool]) -> None:
    client, service = served
    service.tool_call_processors = lambda **_: [Explode()]
    try:
        res = await call(client, tools, "tool_call", {"prompt": "x", "tools": [WEATHER]})
    finally:
        service.tool_call_processors = service.constraints
    text = error_text(res)
    assert "generation failed (request mcp-" in text and "exploded" not in text
    assert not (await call(client, tools, "chat", {"prompt": "still serving?", "max_tokens": 1})).is_error
    stats = service.host.aengine.stats()
    assert stats.running == 0 and stats.cache_usage == 0.0


# ------------------------------------------------------------------------ constrained decoding via the tools

ORDER = {"type": "object", "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
    "when": {"type": "string", "format": "date"},
    "gift": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["fast", "cheap"]}, "maxItems": 2}},
    "required": ["sku", "qty", "when"]}
SEARCH = {"name": "search", "description": "Search the web",
          "inputSchema": {"type": "object", "properties": {
              "query": {"type": "string", "minLength": 2},
              "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["query", "limit"]}}


async def test_tool_call_required_always_returns_valid_calls(served: tuple[Client, ChatService],
                                                             tools: dict[str, Tool]) -> None:
    """Random weights at temperature 1: every required / named call parses and validates, within max_tokens."""
    client, service = served
    assert service.tool_call_processors is service.constraints is not None
    assert "not constrain" not in tools["tool_call"].description
    order_tool = {"name": "place_order", "inputSchema": ORDER}
    schemas = {"get_weather": WEATHER["inputSchema"], "search": SEARCH["inputSchema"], "place_order": ORDER}
    seed = fresh_seed()
    for i, (choice, max_tokens) in enumerate([("required", 40), ("required", 90), ({"name": "place_order"}, 60),
                                              ({"name": "search"}, 24)]):
        args = {"prompt": "Do it.", "tools": [WEATHER, SEARCH, order_tool], "tool_choice": choice,
                "max_tokens": max_tokens, "temperature": 1.0, "seed": seed + i}
        out = (await call(client, tools, "tool_call", args)).structured_content
        ctx = f"choice={choice} max_tokens={max_tokens} seed={seed + i}: {out}"
        assert out["invalid_tool_calls"] == [] and out["tool_calls"], ctx
        assert out["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= max_tokens, ctx
        for c in out["tool_calls"]:
            jsonschema.validate(c["arguments"], schemas[c["name"]])
        if isinstance(choice, dict):
            assert {c["name"] for c in out["tool_calls"]} == {choice["name"]}, ctx


async def test_chat_response_format_validates(served: tuple[Client, ChatService], tools: dict[str, Tool]) -> None:
    client = served[0]
    seed = fresh_seed()
    fmt = {"type": "json_schema", "schema": ORDER}
    out = (await call(client, tools, "chat", {"prompt": "An order.", "response_format": fmt, "max_tokens": 48,
                                              "temperature": 1.0, "seed": seed})).structured_content
    assert out["parse_error"] is None and out["finish_reason"] == "stop", (seed, out)
    jsonschema.validate(out["parsed"], ORDER)
    assert json.loads(out["text"]) == out["parsed"]
    openai_style = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    out = (await call(client, tools, "chat", {"prompt": "An order.", "response_format": openai_style,
                                              "max_tokens": 30, "temperature": 1.0, "seed": seed + 1})
           ).structured_content
    jsonschema.validate(out["parsed"], ORDER)
    out = (await call(client, tools, "chat", {"prompt": "Any object.", "response_format": {"type": "json_object"},
                                              "max_tokens": 16, "temperature": 1.0, "seed": seed + 2})
           ).structured_content
    assert isinstance(out["parsed"], dict) and out["parse_error"] is None, (seed, out)
    plain = (await call(client, tools, "chat", {"prompt": "hi", "response_format": {"type": "text"},
                                                "max_tokens": 2})).structured_content
    assert plain["parsed"] is None and plain["parse_error"] is None and plain["steered"] is False


async def test_think_then_json_answer(served: tuple[Client, ChatService], tools: dict[str, Tool]) -> None:
    """Reasoning is free text; the answer after </think> is JSON for the schema, also when the reasoning would
    use up the budget (the grammar closes it in time)."""
    client = served[0]
    seed = fresh_seed()
    for budget, max_tokens in ((6, 60), (59, 60)):
        args = {"prompt": "Order?", "response_format": {"type": "json_schema", "schema": ORDER},
                "thinking_budget": budget, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed}
        out = (await call(client, tools, "think", args)).structured_content
        ctx = f"budget={budget} seed={seed}: {out}"
        assert out["reasoning_complete"] and out["parse_error"] is None and out["finish_reason"] == "stop", ctx
        assert out["reasoning_tokens"] <= budget + 1, ctx  # the reasoning plus its </think>
        assert out["usage"]["completion_tokens"] <= max_tokens, ctx
        jsonschema.validate(out["parsed"], ORDER)
        assert json.loads(out["answer"]) == out["parsed"]
    assert (budget, out["steered"]) == (59, True)


async def test_tool_choice_none_never_calls_even_when_pushed(served: tuple[Client, ChatService],
                                                             tools: dict[str, Tool], engine: Engine) -> None:
    """A model that wants nothing but the tool-call tokens still writes no call with tool_choice 'none'."""
    client, service = served
    tok = engine.tokenizer
    openers = [tok.token_to_id(t) for t in ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>")]
    pushed = [tok.token_to_id(t) for t in ("<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")]

    class Push:
        def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            logits[openers + pushed] += 1000.0
            return logits

    constraints = service.constraints

    def pushing(**kw: Any) -> list[Any]:
        return [Push(), *constraints(**kw)]  # the push first: the ban must hold against it

    service.tool_call_processors = pushing
    try:
        out = (await call(client, tools, "tool_call", {"prompt": "x", "tools": [WEATHER], "tool_choice": "none",
                                                       "max_tokens": 12, "temperature": 1.0})).structured_content
    finally:
        service.tool_call_processors = constraints
    assert out["tool_calls"] == [] and out["invalid_tool_calls"] == [] and out["usage"]["completion_tokens"] > 0
    assert "tool▁call" not in out["text"]


CONSTRAINT_ERRORS = [
    ("tool_call", {"prompt": "x", "tools": [WEATHER], "tool_choice": "required", "max_tokens": 3}, "too small"),
    ("tool_call", {"prompt": "x", "tools": [{"name": "f", "inputSchema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}], "tool_choice": "required"},
     "tool 'f': the grammar engine cannot compile the schema"),
    ("chat", {"prompt": "x", "response_format": {"type": "json_schema", "schema": {"type": "nope"}}},
     "response_format"),
    ("chat", {"prompt": "x", "response_format": {"type": "json_schema"}}, "needs exactly one of `schema`"),
    ("chat", {"prompt": "x", "response_format": {"type": "json_object", "schema": {}}}, "takes no schema"),
]


@pytest.mark.parametrize(("tool", "args", "needle"), CONSTRAINT_ERRORS,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(CONSTRAINT_ERRORS)])
async def test_constraint_errors_come_before_generation(served: tuple[Client, ChatService], tools: dict[str, Tool],
                                                        tool: str, args: dict[str, Any], needle: str) -> None:
    before = served[1].host.aengine.stats()
    assert needle in error_text(await call(served[0], tools, tool, args))
    after = served[1].host.aengine.stats()
    assert (after.num_steps, after.prefix_query_tokens) == (before.num_steps, before.prefix_query_tokens)


async def test_response_format_without_constraints_is_refused(engine: Engine) -> None:
    config = make_config().model_copy(update={"constrained_decoding": False})
    async with serving(engine, config) as (client, service):
        assert service.constraints is None and service.tool_call_processors is None
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert "not constrain" in listed["tool_call"].description
        res = await client.call_tool("chat", {"prompt": "x", "response_format": {"type": "json_object"}})
        assert "response_format needs constrained decoding" in error_text(res)
