"""The Anthropic Messages API with the official `anthropic` client against a live loopback server (demo model)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema
import pytest
from api_server import LiveServer, live_server

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.mcp_server.api import anthropic_stream
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig

TOKEN = "api-test-token-" + os.urandom(6).hex()
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
         "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": CITY},
         {"name": "count", "description": "Count", "input_schema": COUNT}]
SCHEMAS = {"get_weather": CITY, "count": COUNT}
HI = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    engine = Engine.from_pretrained(None)
    config = ServerConfig(cache_tokens=8192, token=TOKEN, sampling=SamplingDefaults(temperature=0.0),
                          limits=Limits(max_tokens=8, progress_interval_s=0.2))
    with live_server(config, lambda: engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=TOKEN, base_url=server.url, max_retries=0)


def test_models_in_anthropic_shape(client: anthropic.Anthropic) -> None:
    assert [m.id for m in client.models.list().data] == ["deepseek-v3.1-demo", "deepseek-chat", "deepseek-reasoner"]


def test_message_shape_and_thinking_budget(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="deepseek-chat", max_tokens=16, messages=HI, system="Be brief.")
    assert m.type == "message" and m.role == "assistant" and m.model == "deepseek-chat"
    assert [b.type for b in m.content] == ["text"] and m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 16 and m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    m = client.messages.create(model="deepseek-chat", max_tokens=16, messages=HI,
                               thinking={"type": "enabled", "budget_tokens": 5})
    assert [b.type for b in m.content] == ["thinking", "text"] and m.content[0].signature
    off = client.messages.create(model="deepseek-chat", max_tokens=16, messages=HI, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model="deepseek-chat", max_tokens=12, messages=HI).content[0].text
    word = first.strip().split()[1] if len(first.strip().split()) > 1 else first.strip()[2:4]
    m = client.messages.create(model="deepseek-chat", max_tokens=12, messages=HI, stop_sequences=[word])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert word not in m.content[0].text


def stream_events(server: LiveServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    with httpx.Client(base_url=server.url, headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
                      timeout=60) as http, http.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                events.append((kind, data))
    return events


def test_stream_event_sequence_with_pings(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic_stream, "PING_INTERVAL_S", 0.02)
    long = [{"role": "user", "content": "word " * 1500}]  # a prefill of several steps
    events = stream_events(server, {"model": "deepseek-chat", "max_tokens": 12, "messages": long,
                                    "thinking": {"type": "enabled", "budget_tokens": 4}})
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "ping" in kinds[: kinds.index("content_block_start")]
    open_index, next_index = None, 0  # blocks: start i, deltas of i, stop i; i = 0, 1, 2, ...
    for kind, data in events[1:-2]:
        if kind == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif kind in ("content_block_delta", "content_block_stop"):
            assert data["index"] == open_index
            open_index = None if kind == "content_block_stop" else open_index
        else:
            assert kind == "ping"
    assert open_index is None and next_index == 2
    deltas = [d["delta"] for k, d in events if k == "content_block_delta"]
    assert deltas[0]["type"] == "thinking_delta" and any(d["type"] == "signature_delta" for d in deltas)
    assert any(d["type"] == "text_delta" for d in deltas)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "count"}, {"type": "auto"}])
def test_tools_stream_equals_non_stream(client: anthropic.Anthropic, choice: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"model": "deepseek-chat", "max_tokens": 40, "messages": HI, "tools": TOOLS,
                          "tool_choice": choice}
    m = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        for _ in s:
            pass
        final = s.get_final_message()
    uses = [b for b in m.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(b.name, b.input) for b in uses]
    assert "".join(b.text for b in final.content if b.type == "text") == \
        "".join(b.text for b in m.content if b.type == "text")
    assert final.stop_reason == m.stop_reason
    assert (m.stop_reason == "tool_use") == bool(uses)
    if choice["type"] != "auto":
        assert uses and m.stop_reason == "tool_use"
        if choice["type"] == "tool":
            assert {b.name for b in uses} == {"count"}
    for b in uses:
        jsonschema.validate(b.input, SCHEMAS[b.name])
        assert b.id.startswith("toolu_")


def test_tool_round_trip_and_count_tokens(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    m = client.messages.create(model="deepseek-chat", max_tokens=40, messages=messages, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": [{"type": "text", "text": "21 C"}]},
        {"type": "text", "text": "Thanks; and tomorrow?"}]})
    m2 = client.messages.create(model="deepseek-chat", max_tokens=8, messages=messages, tools=TOOLS,
                                tool_choice={"type": "none"})
    assert m2.content[0].type == "text" and m2.stop_reason in ("end_turn", "max_tokens")
    assert m2.usage.cache_read_input_tokens >= 16
    counted = client.messages.count_tokens(model="deepseek-chat", messages=messages, tools=TOOLS)
    assert counted.input_tokens == m2.usage.input_tokens + m2.usage.cache_read_input_tokens
    failed = messages[:-1] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "no such city", "is_error": True}]}]
    assert client.messages.create(model="deepseek-chat", max_tokens=4, messages=failed).content


def test_prefill_continues_the_assistant_message(client: anthropic.Anthropic, server: LiveServer) -> None:
    from deepseek_mcp.inference.text.parse import parse
    from deepseek_mcp.inference.text.template import render_ids

    prefill = "The answer is"
    messages: list[Any] = [*HI, {"role": "assistant", "content": prefill}]
    m = client.messages.create(model="deepseek-chat", max_tokens=8, messages=messages)
    with client.messages.stream(model="deepseek-chat", max_tokens=8, messages=messages) as s:
        streamed = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    assert "".join(b.text for b in streamed.content if b.type == "text") == text
    # the same as continuing the rendered open turn: the prefill is in the prompt, not in the response
    assert server.service is not None
    tokenizer = server.service.host.engine.tokenizer
    ids = render_ids([*HI, {"role": "assistant", "content": prefill, "prefix": True}], tokenizer,
                     continue_final_message=True)
    assert ids[-len(tokenizer.encode(prefill)):] == tokenizer.encode(prefill)
    with httpx.Client(base_url=server.url, headers={"x-api-key": TOKEN}) as http:
        raw = http.post("/v1/completions", json={"model": "deepseek-chat", "prompt": ids, "max_tokens": 8}).json()
    assert parse(raw["choices"][0]["text"]).content == text
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
    assert client.messages.count_tokens(model="deepseek-chat", messages=messages).input_tokens == len(ids)
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        client.messages.create(model="deepseek-chat", max_tokens=8, messages=messages,
                               thinking={"type": "enabled", "budget_tokens": 4})


def test_errors_by_status_and_shape(client: anthropic.Anthropic, server: LiveServer) -> None:
    def status(**kw: Any) -> tuple[int, dict[str, Any]]:
        try:
            client.messages.create(**{"model": "deepseek-chat", "max_tokens": 8, "messages": HI, **kw})
        except anthropic.APIStatusError as e:
            assert e.body["type"] == "error"
            return e.status_code, e.body["error"]
        raise AssertionError("no error")

    code, err = status(model="claude-sonnet-4-5")
    assert code == 404 and err["type"] == "not_found_error" and "deepseek-chat" in err["message"]
    code, err = status(thinking={"type": "enabled", "budget_tokens": 8})
    assert code == 400 and "thinking.budget_tokens" in err["message"]
    code, err = status(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert code == 400 and err["type"] == "invalid_request_error" and "messages.0.content.0" in err["message"]
    code, err = status(max_tokens=0)
    assert code == 400 and "max_tokens" in err["message"]
    code, err = status(tool_choice={"type": "any"})
    assert code == 400 and "tool_choice" in err["message"]
    bad = anthropic.Anthropic(api_key="wrong", base_url=server.url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="deepseek-chat", max_tokens=8, messages=HI)
    assert e.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(auth_token=TOKEN, base_url=server.url, max_retries=0)  # ANTHROPIC_AUTH_TOKEN
    assert bearer.messages.create(model="deepseek-chat", max_tokens=2, messages=HI).content


def test_system_messages_inside_messages(server: LiveServer) -> None:
    """Claude Code sends `{"role": "system"}` messages inside `messages` (anthropic-beta
    mid-conversation-system-2026-04-07): served, rendered where V3.1's template puts system text (the prompt's
    head, after the top-level `system`, joined by a blank line); a non-text block in one is a 400 naming it."""
    headers = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01",
               "anthropic-beta": "mid-conversation-system-2026-04-07"}
    inside = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
              {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
              {"role": "user", "content": "And now?"}]
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        r = http.post("/v1/messages", json={"model": "deepseek-chat", "max_tokens": 4, "system": "Be brief.",
                                            "messages": inside})
        assert r.status_code == 200, r.text
        assert r.json()["type"] == "message" and r.json()["usage"]["output_tokens"] > 0

        def count(**body: Any) -> int:
            got = http.post("/v1/messages/count_tokens", json={"model": "deepseek-chat", **body})
            assert got.status_code == 200, got.text
            return got.json()["input_tokens"]

        head = [m for m in inside if m["role"] != "system"]
        assert count(system="Be brief.", messages=inside) == count(system="Be brief.\n\nAnswer in French.",
                                                                  messages=head)
        assert count(system="Be brief.", messages=inside) > count(system="Be brief.", messages=head)
        bad = [*head[:2], {"role": "system", "content": [{"type": "image", "source": {}}]}, head[2]]
        r = http.post("/v1/messages", json={"model": "deepseek-chat", "max_tokens": 4, "messages": bad})
        assert r.status_code == 400 and "messages.2.content.0" in r.json()["error"]["message"]
