"""The Responses API (POST /v1/responses and the stored-response routes) with the official `openai` client, the
OpenAI Agents SDK, and the Codex CLI / Claude Code against a live loopback server (demo model).

The demo model's weights are random: it ends an answer (EOS) only by chance. `EosBias` raises the EOS logit so
that it ends after a few tokens (the tests that need a completed turn: the stream helper, the agents, the CLIs),
or leaves it alone (0: every answer runs to max_output_tokens)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema
import openai
import pytest
from api_server import LiveServer, live_server
from openai import OpenAI

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig

TOKEN = "responses-test-" + os.urandom(6).hex()
MODEL = "deepseek-chat"
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": CITY,
           "strict": True}
CODE = r"[0-9]{3}-[a-z]{2,4}"
PATCH_LARK = 'start: "*** " NAME " " NUMBER\nNAME: /[a-z]{2,6}/\nNUMBER: /[0-9]{1,3}/'
INSTRUCTIONS = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(24))


class EosBias:
    """Adds `value` to the EOS logit of the engine's output head (0: the demo model as it is)."""

    def __init__(self, engine: Engine, value: float) -> None:
        self.value = value
        head, eos = engine.model.lm_head, engine.tokenizer.eos_id
        forward = head.forward

        def biased(h: Any) -> Any:
            out = forward(h)
            if self.value:
                out[..., eos] += self.value
            return out

        head.forward = biased

    @contextmanager
    def set(self, value: float) -> Iterator[None]:
        old, self.value = self.value, value
        try:
            yield
        finally:
            self.value = old


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(None)


@pytest.fixture(scope="module")
def bias(engine: Engine) -> EosBias:
    return EosBias(engine, 0.0)


@pytest.fixture(scope="module")
def server(engine: Engine, bias: EosBias) -> Iterator[LiveServer]:
    # cache_tokens: room for the coding agents' prompts (Codex's is ~6k tokens, Claude Code's ~18k)
    config = ServerConfig(cache_tokens=40960, token=TOKEN, sampling=SamplingDefaults(temperature=0.0),
                          limits=Limits(max_tokens=48, progress_interval_s=0.2, max_wall_time_s=300))
    with live_server(config, lambda: engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(api_key=TOKEN, base_url=server.url + "/v1", max_retries=0)


def error_of(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def events_of(server: LiveServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The raw SSE events of a streamed request, checked: `event:` names the data's type."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as http, \
            http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        ev = json.loads(data.removeprefix("data: "))
        assert name == f"event: {ev['type']}"
        events.append(ev)
    return events


def test_input_items_as_template_messages() -> None:
    from deepseek_mcp.mcp_server.api.responses import input_items, template_messages

    items = input_items([
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "g", "input": "raw"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ])
    assert len({i["id"] for i in items}) == len(items) and items[2]["id"] == "rs_1"
    messages = template_messages(items)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "ab" and messages[2]["content"] == "Let me look."
    assert [c["function"]["arguments"] for c in messages[2]["tool_calls"]] == ["{}", "raw"]
    assert [m["content"] for m in messages[3:]] == ["one", "two"]


def test_input_items_page() -> None:
    from deepseek_mcp.mcp_server.api.errors import ApiError
    from deepseek_mcp.mcp_server.api.response_store import input_items_page

    items = [{"id": f"i{k}"} for k in range(5)]
    page = input_items_page(items, order="desc", limit=2, after=None)
    assert [i["id"] for i in page["data"]] == ["i4", "i3"] and page["has_more"] and page["last_id"] == "i3"
    page = input_items_page(items, order="asc", limit=10, after="i2")
    assert [i["id"] for i in page["data"]] == ["i3", "i4"] and not page["has_more"]
    with pytest.raises(ApiError, match="after"):
        input_items_page(items, order="asc", limit=10, after="nope")


def test_create_plain(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=8,
                                metadata={"case": "plain"}, user="u1", prompt_cache_key="k",
                                include=["reasoning.encrypted_content"])
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].status == "incomplete"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 5 and r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.metadata == {"case": "plain"} and r.instructions == "Be brief." and r.max_output_tokens == 8


def test_completed_when_the_model_ends(client: OpenAI, bias: EosBias) -> None:
    with bias.set(3.5):
        r = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=40)
    assert r.status == "completed" and r.incomplete_details is None and r.usage.output_tokens < 40


@pytest.mark.parametrize("reasoning", [None, {"effort": "low", "summary": "auto"}])
def test_stream_equals_non_stream(client: OpenAI, server: LiveServer, reasoning: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": [{"role": "user", "content": "Tell me a story"}],
                            "max_output_tokens": 16, "temperature": 0}
    if reasoning:
        body["reasoning"] = reasoning
    plain = client.responses.create(**body)
    events = events_of(server, body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["usage"] == plain.usage.model_dump(exclude_none=True)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == plain.output_text and text
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    assert [o["type"] for o in final["output"]] == [o.type for o in plain.output]
    if reasoning:
        thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
        item = plain.output[0]
        assert item.type == "reasoning" and thought == summary == item.content[0].text == item.summary[0].text
        assert item.encrypted_content is None and plain.usage.output_tokens_details.reasoning_tokens == 4


def test_stream_helper_with_json_schema(client: OpenAI, bias: EosBias) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "count", "schema": schema, "strict": True}}
    with bias.set(3.5):
        with client.responses.stream(model=MODEL, input="Count", text=fmt, max_output_tokens=24) as stream:
            kinds = [ev.type for ev in stream]
            final = stream.get_final_response()
        plain = client.responses.create(model=MODEL, input="Count", text=fmt, max_output_tokens=24)
    assert kinds[-1] == "response.completed" and "response.output_text.done" in kinds
    jsonschema.validate(json.loads(final.output_text), schema)
    assert final.output_text == plain.output_text and final.status == plain.status == "completed"


def test_function_tools_required(client: OpenAI, server: LiveServer) -> None:
    count = {"type": "function", "name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER, count, {"type": "web_search"}],
                                tool_choice="required", parallel_tool_calls=False, max_output_tokens=40)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].call_id.startswith("call_") and r.status == "completed"
    schema = CITY if calls[0].name == "get_weather" else count["parameters"]
    jsonschema.validate(json.loads(calls[0].arguments), schema)
    # streamed, a named function: the argument deltas join to the call's arguments
    events = events_of(server, {"model": MODEL, "input": "Weather?", "tools": [WEATHER],
                                "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 40})
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    item = events[-1]["response"]["output"][-1]
    assert args == done["arguments"] == item["arguments"] and item["type"] == "function_call"
    jsonschema.validate(json.loads(args), CITY)


@pytest.mark.parametrize("fmt, pattern", [
    ({"type": "grammar", "syntax": "regex", "definition": CODE}, CODE),
    ({"type": "grammar", "syntax": "lark", "definition": PATCH_LARK}, r"\*\*\* [a-z]{2,6} [0-9]{1,3}"),
    ({"type": "text"}, r"[^\x00]*"),
    ({"type": "grammar", "syntax": "regex", "definition": r"x.*"}, r"x[^\x00]*")])  # `.` as xgrammar reads it
def test_custom_tool_grammar(client: OpenAI, server: LiveServer, fmt: dict[str, Any], pattern: str) -> None:
    tool = {"type": "custom", "name": "code", "description": "Submit a code", "format": fmt}
    r = client.responses.create(model=MODEL, input="Give me a code", tools=[tool, WEATHER],
                                tool_choice={"type": "custom", "name": "code"}, max_output_tokens=40)
    call = r.output[-1]
    assert call.type == "custom_tool_call" and call.name == "code" and re.fullmatch(pattern, call.input), call
    # the call and its output continue the conversation (tools, as instructions, are given again each time)
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=4, tools=[tool, WEATHER],
                                 input=[{"type": "custom_tool_call_output", "call_id": call.call_id,
                                         "output": "accepted"}])
    assert r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens // 2  # the call is in the history
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 16
    # streamed: the input deltas join to the call's input
    events = events_of(server, {"model": MODEL, "input": "Another code", "tools": [tool], "tool_choice": "required",
                                "max_output_tokens": 40})
    text = "".join(e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta")
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    item = events[-1]["response"]["output"][-1]
    assert text == done["input"] == item["input"] and item["type"] == "custom_tool_call"
    assert re.fullmatch(pattern, text)


def test_text_format_json_schema(client: OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    r = client.responses.create(model=MODEL, input="A city", text=fmt, max_output_tokens=32)
    jsonschema.validate(json.loads(r.output_text), CITY)
    assert r.text.format.type == "json_schema"


def test_reasoning_on_and_off(client: OpenAI) -> None:
    on = client.responses.create(model=MODEL, input="Think", reasoning={"effort": "medium"}, max_output_tokens=16)
    assert on.output[0].type == "reasoning" and on.output[0].content[0].text and on.output[0].summary == []
    assert on.usage.output_tokens_details.reasoning_tokens == 8  # medium: half of max_output_tokens
    off = client.responses.create(model="deepseek-reasoner", input="Think", reasoning={"effort": "none"},
                                  max_output_tokens=8)
    assert [o.type for o in off.output] == ["message"] and off.usage.output_tokens_details.reasoning_tokens == 0
    default = client.responses.create(model="deepseek-reasoner", input="Think", max_output_tokens=8)
    assert default.output[0].type == "reasoning"


def test_previous_response_chain_retrieve_items_delete(client: OpenAI) -> None:
    r1 = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input="First question", max_output_tokens=6)
    r2 = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input="Second question",
                                 previous_response_id=r1.id, max_output_tokens=6)
    r3 = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, previous_response_id=r2.id,
                                 input=[{"type": "message", "role": "user",
                                         "content": [{"type": "input_text", "text": "Third"}]}], max_output_tokens=6)
    assert r1.usage.input_tokens < r2.usage.input_tokens < r3.usage.input_tokens
    assert r1.usage.input_tokens_details.cached_tokens < r2.usage.input_tokens_details.cached_tokens \
        < r3.usage.input_tokens_details.cached_tokens
    assert r3.usage.input_tokens_details.cached_tokens >= r2.usage.input_tokens - 16
    got = client.responses.retrieve(r2.id)
    assert got.model_dump() == r2.model_dump() and got.previous_response_id == r1.id
    items = client.responses.input_items.list(r3.id, order="asc")
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "Third"
    client.responses.delete(r1.id)
    status, body = error_of(lambda: client.responses.retrieve(r1.id))
    assert status == 404 and r1.id in body["message"]
    # r2 keeps its own copy of the conversation
    r4 = client.responses.create(model=MODEL, previous_response_id=r2.id, input="Again", max_output_tokens=4)
    assert r4.usage.input_tokens < r3.usage.input_tokens + 8


def test_concurrent_continuations_branch(client: OpenAI) -> None:
    base = client.responses.create(model=MODEL, input="Start", max_output_tokens=4)
    out: dict[str, Any] = {}

    def go(word: str) -> None:
        out[word] = client.responses.create(model=MODEL, previous_response_id=base.id, input=word,
                                            max_output_tokens=6)

    threads = [threading.Thread(target=go, args=(w,)) for w in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    left, right = out["left"], out["right"]
    assert left.id != right.id and left.previous_response_id == right.previous_response_id == base.id
    assert client.responses.input_items.list(left.id).data[0].content[0].text == "left"
    assert client.responses.input_items.list(right.id).data[0].content[0].text == "right"


def test_store_false_is_not_kept(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert r.store is False
    status, body = error_of(lambda: client.responses.retrieve(r.id))
    assert status == 404 and body["code"] == "response_not_found"


def test_errors(client: OpenAI, server: LiveServer) -> None:
    def create(**kw: Any) -> Any:
        return lambda: client.responses.create(**{"model": MODEL, "input": "Hi", "max_output_tokens": 4, **kw})

    status, body = error_of(create(extra_body={"frobnicate": 1}))
    assert status == 400 and body["param"] == "frobnicate" and "unknown field" in body["message"]
    status, body = error_of(create(previous_response_id="resp_nope"))
    assert status == 404 and body["param"] == "previous_response_id" and "resp_nope" in body["message"]
    bad = {**WEATHER, "parameters": {"type": "object", "properties": {"city": {"type": "nope"}}}}
    status, body = error_of(create(tools=[bad]))
    assert status == 400 and body["param"] == "tools" and "get_weather" in body["message"]
    status, body = error_of(create(input="x " * 45000))
    assert status == 400 and body["param"] == "input" and "context" in body["message"]
    status, body = error_of(create(max_output_tokens=10**6))
    assert status == 400 and body["param"] == "max_output_tokens"
    status, body = error_of(create(background=True))
    assert status == 400 and body["param"] == "background" and body["code"] == "unsupported"
    status, body = error_of(create(input=[{"type": "input_image", "image_url": "x"}]))
    assert status == 400 and body["param"] == "input[0].type"
    status, body = error_of(create(tools=[{"type": "custom", "name": "c", "format": {
        "type": "grammar", "syntax": "regex", "definition": "(unclosed"}}], tool_choice="required"))
    assert status == 400 and "regex" in body["message"]
    status, body = error_of(create(tools=[WEATHER], tool_choice={"type": "custom", "name": "get_weather"}))
    assert status == 400 and body["param"] == "tool_choice" and "custom" in body["message"]
    status, body = error_of(create(input=[{"type": "function_call_output", "call_id": "c", "output": {"x": 1}}]))
    assert status == 400 and body["param"] == "input[0].output"
    status, body = error_of(create(text={"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "bogus"}}}}}))
    assert status == 400 and body["param"] == "text.format" and "response_format" not in body["message"]
    status, body = error_of(create(tool_choice="required"))
    assert status == 400 and body["param"] == "tool_choice"
    status, body = error_of(create(include=["nonsense"]))
    assert status == 400 and body["param"].startswith("include")
    r = httpx.delete(server.url + "/v1/responses/resp_gone", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_failure_mid_stream_sends_error_and_failed(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_mcp.inference.text.parse import ContentDelta
    from deepseek_mcp.mcp_server.engine_request import Decoded
    from deepseek_mcp.mcp_server.failures import GenerationFailed

    async def failing_run(*args: Any, on_events: Any = None, **kw: Any) -> Any:
        on_events(Decoded("partial", [ContentDelta("partial")], [], 7))
        raise GenerationFailed("generation failed: the engine broke (test)")

    assert server.service is not None
    monkeypatch.setattr(server.service, "run", failing_run)
    events = events_of(server, {"model": MODEL, "input": "Hi", "max_output_tokens": 8})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "generation_failed" and "engine broke" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    assert any(e.get("delta") == "partial" for e in events)


def test_disconnect_mid_stream_aborts(server: LiveServer) -> None:
    aengine = server.aengine
    body = {"model": MODEL, "input": "Hello", "max_output_tokens": 2000, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http, \
            http.stream("POST", "/v1/responses", json=body) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        assert aengine.stats().running == 1
    deadline = time.monotonic() + 5
    while (aengine.stats().running or aengine.block_manager.usage) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aengine.stats().running == 0 and aengine.block_manager.usage == 0


def test_agents_sdk_tool_turn(server: LiveServer, bias: EosBias) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (pip install openai-agents)")
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        seen.append(city)
        return f"sunny in {city}"

    aclient = openai.AsyncOpenAI(api_key=TOKEN, base_url=server.url + "/v1", max_retries=0)
    agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                  model=OpenAIResponsesModel(model=MODEL, openai_client=aclient),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=40))
    with bias.set(3.5):
        result = Runner.run_sync(agent, "Weather in Paris?", max_turns=3,
                                 run_config=RunConfig(tracing_disabled=True))
    assert len(seen) == 1 and isinstance(seen[0], str)
    kinds = [type(i).__name__ for i in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"] and kinds[-1] == "MessageOutputItem"
    assert agents.__name__ == "agents"


# -- the coding agents' CLIs (npm packages, installed once per session into a temporary prefix) --------------


@pytest.fixture(scope="session")
def npm_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    prefix = tmp_path_factory.mktemp("npm")
    try:
        done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                               "@openai/codex", "@anthropic-ai/claude-code"], capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install of @openai/codex and @anthropic-ai/claude-code timed out (no network?)")
    if done.returncode != 0:
        pytest.skip(f"npm install failed (no network?): {done.stderr.strip()[-300:]}")
    return prefix / "node_modules" / ".bin"


@pytest.mark.slow
def test_codex_exec_turn(server: LiveServer, bias: EosBias, npm_bin: Path, tmp_path: Path,
                         caplog: pytest.LogCaptureFixture) -> None:
    home, work = tmp_path / "codex_home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(f"""model = "{MODEL}"
model_provider = "deepseek-mcp"
model_context_window = 40960
model_reasoning_effort = "low"

[model_providers.deepseek-mcp]
name = "deepseek-mcp"
base_url = "{server.url}/v1"
env_key = "DEEPSEEK_MCP_TOKEN"
wire_api = "responses"
""")
    env = {**os.environ, "CODEX_HOME": str(home), "DEEPSEEK_MCP_TOKEN": TOKEN, "NO_COLOR": "1"}
    caplog.set_level("INFO", logger="deepseek_mcp.mcp_server.engine_request")
    with bias.set(5.0):  # EOS within the 48 tokens whatever the prompt (its session id and paths vary)
        done = subprocess.run([str(npm_bin / "codex"), "exec", "--skip-git-repo-check", "Say hello"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    print(out[-2000:])
    assert done.returncode == 0 and "ERROR" not in out and "ignoring" not in out, out[-2000:]
    assert any(r.getMessage().startswith("responses resp_") and "completion tokens" in r.getMessage()
               for r in caplog.records)  # the request's one log line: it came through /v1/responses


@pytest.mark.slow
def test_claude_code_turn(server: LiveServer, bias: EosBias, npm_bin: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_AUTH_TOKEN": TOKEN,
           "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL, "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           # its default max_tokens (32000) and its ~18k-token prompt do not fit this server's 40960-token cache
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "1024"}
    with bias.set(3.5):
        done = subprocess.run([str(npm_bin / "claude"), "-p", "Say hello", "--max-turns", "1", "--output-format",
                               "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["is_error"] is False and result["subtype"] == "success" and result["api_error_status"] is None
