"""The API's stream assemblers on recorded V3.1 outputs, re-chunked at every boundary: the joined OpenAI deltas
and Anthropic events equal the non-streamed message built from the same text, whatever the token boundaries.
Also the request mapping (thinking switches, tools, Anthropic history) and the penalties processor."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import torch

from inference.text.parse import StreamParser, parse
from inference.text.template import THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END
from inference.text.template import TOOL_SEP as SEP
from mcp_server.api import anthropic_messages, openai_chat
from mcp_server.api.anthropic_stream import MessageStream
from mcp_server.api.errors import ApiError
from mcp_server.api.generation import Choice, Plan, call_limit
from mcp_server.api.openai_stream import event_deltas
from mcp_server.api.requests import ChatCompletionRequest, MessagesRequest
from mcp_server.generate import RunResult
from mcp_server.processors import Penalties


def block(*calls: tuple[str, str]) -> str:
    return TOOL_CALLS_BEGIN + "".join(f"{TOOL_CALL_BEGIN}{n}{SEP}{a}{TOOL_CALL_END}" for n, a in calls) + TOOL_CALLS_END


# (output text as generated, thinking?) -- recorded shapes of V3.1 output, incl. the parser-failure cases of
# other servers: a call whose whole block arrives in one delta, text that looks like a marker, </think> in
# non-thinking mode, calls after reasoning, content before and after calls.
RECORDED = [
    ("Let me think about 2+2." + THINK_END + "It is 4.", True),
    ("No thinking here, but a literal " + THINK_END + " in the answer.", False),
    (block(("get_weather", '{"city": "Paris"}')), False),
    ("Checking both." + block(("get_weather", '{"city":"Oslo"}'), ("count", '{"n": 3}')), False),
    ("plan: call it" + THINK_END + block(("count", '{"n":1}')), True),
    ("a < b and <｜not a marker｜> stays" + block(("count", '{"n": 2}')) + " done", False),
    ('{"answer": "<tag> and {braces}"}', False),
]


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    return out


def fake_choice(text: str, thinking: bool, plan: Plan) -> Choice:
    parsed = parse(text, thinking=thinking, tools=["get_weather", "count"])
    calls = parsed.tool_calls[:call_limit(plan)]
    run = RunResult([1] * 5, text, "stop", 10, 0, 0.1)
    return Choice(0, run, parsed, calls, [f"call_{i}" for i in range(len(calls))], 0,
                  "tool_calls" if calls else "stop", None)


def assemble_openai(pieces: list[str], thinking: bool, plan: Plan) -> dict[str, Any]:
    parser = StreamParser(thinking=thinking, tools=["get_weather", "count"])
    ids: dict[int, str] = {}
    deltas = []
    for p in pieces:
        deltas += event_deltas(parser.feed(p), call_limit(plan), ids)
    deltas += event_deltas(parser.finish(), call_limit(plan), ids)
    got: dict[str, Any] = {"content": "", "reasoning": "", "calls": {}}
    for d in deltas:
        got["content"] += d.get("content", "")
        got["reasoning"] += d.get("reasoning_content", "")
        assert d.get("reasoning", "") == d.get("reasoning_content", "")
        for tc in d.get("tool_calls", []):
            if tc["index"] not in got["calls"]:
                assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                got["calls"][tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert "id" not in tc and "name" not in tc["function"]
            got["calls"][tc["index"]]["arguments"] += tc["function"]["arguments"]
    return got


@pytest.mark.parametrize(("text", "thinking"), RECORDED)
@pytest.mark.parametrize("parallel", [True, False])
def test_openai_deltas_join_to_the_message_at_every_boundary(text: str, thinking: bool, parallel: bool) -> None:
    plan = Plan(thinking=thinking, parallel_tool_calls=parallel)
    msg = openai_chat.message(fake_choice(text, thinking, plan), thinking)
    want = {"content": msg["content"] or "", "reasoning": msg.get("reasoning_content", ""),
            "calls": {i: {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                      for i, c in enumerate(msg.get("tool_calls", []))}}
    if not thinking:
        assert "reasoning_content" not in msg
    for pieces in chunkings(text):
        assert assemble_openai(pieces, thinking, plan) == want, pieces


def assemble_anthropic(pieces: list[str], thinking: bool, plan: Plan, choice: Choice) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def write(data: bytes) -> None:
        line = next(x for x in data.decode().splitlines() if x.startswith("data: "))
        events.append(json.loads(line[6:]))

    async def main() -> None:
        stream = MessageStream(plan, "m", "msg_1", write, 10)
        await stream.begin()
        parser = StreamParser(thinking=thinking, tools=["get_weather", "count"])
        for p in pieces:
            await stream.on_item(0, (p, parser.feed(p)))
        await stream.on_item(0, ("", parser.finish()))
        await stream.on_item(0, choice)

    anyio.run(main)
    blocks: list[dict[str, Any]] = []
    for ev in events:
        if ev["type"] == "content_block_start":
            blocks.append(dict(ev["content_block"], partial=""))
        elif ev["type"] == "content_block_delta":
            d, b = ev["delta"], blocks[ev["index"]]
            key = {"thinking_delta": "thinking", "text_delta": "text", "input_json_delta": "partial",
                   "signature_delta": "signature"}[d["type"]]
            b[key] = b[key] + d[{"input_json_delta": "partial_json"}.get(d["type"], key)]
    assert events[-1]["type"] == "message_stop" and events[-2]["delta"]["stop_reason"] == \
        anthropic_messages.stop_reason(choice)
    return blocks


@pytest.mark.parametrize(("text", "thinking"), RECORDED)
def test_anthropic_events_join_to_the_message_at_every_boundary(text: str, thinking: bool) -> None:
    plan = Plan(thinking=thinking)
    choice = fake_choice(text, thinking, plan)
    want = anthropic_messages.message_response(plan, choice, "m", "msg_1")["content"]
    for pieces in chunkings(text):
        blocks = assemble_anthropic(pieces, thinking, plan, choice)
        thinking_text = "".join(b.get("thinking", "") for b in blocks if b["type"] == "thinking")
        text_text = "".join(b["text"] for b in blocks if b["type"] == "text")
        uses = [(b["name"], json.loads(b["partial"])) for b in blocks if b["type"] == "tool_use"]
        assert thinking_text == "".join(b["thinking"] for b in want if b["type"] == "thinking")
        assert all(b["signature"] for b in blocks if b["type"] == "thinking")
        assert text_text == "".join(b["text"] for b in want if b["type"] == "text")
        assert uses == [(b["name"], b["input"]) for b in want if b["type"] == "tool_use"]


def chat_req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "deepseek-chat", "messages": [
        {"role": "user", "content": "hi"}], **kw})


def test_thinking_switches_and_tool_choice_mapping() -> None:
    assert openai_chat.thinking_of(chat_req(), "deepseek-chat") == (False, None)
    assert openai_chat.thinking_of(chat_req(), "deepseek-reasoner") == (True, None)
    assert openai_chat.thinking_of(chat_req(thinking={"type": "disabled"}), "deepseek-reasoner")[0] is False
    assert openai_chat.thinking_of(chat_req(reasoning_effort="high"), "x") == (True, 0.75)
    with pytest.raises(ApiError, match="chat_template_kwargs.thinking must be"):
        openai_chat.thinking_of(chat_req(chat_template_kwargs={"thinking": "yes"}), "x")
    specs, choice = openai_chat.tool_plan(None, "none")
    assert specs == [] and choice is None
    with pytest.raises(ApiError, match="no tools"):
        openai_chat.tool_plan(None, "required")
    with pytest.raises(ApiError) as e:
        openai_chat.refuse_unsupported(chat_req(logit_bias={"1": 5}))
    assert e.value.param == "logit_bias" and e.value.status == 400


def test_anthropic_history_mapping() -> None:
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "S"}],
                                          "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                     {"type": "tool_result", "tool_use_id": "toolu_2", "content": "x",
                                      "is_error": True},
                                     {"type": "text", "text": "and?"}]}]})
    assert anthropic_messages.template_messages(req) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"c":"P"}'}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "Error: x"},
        {"role": "user", "content": "and?"},
    ]


def test_penalties_processor() -> None:
    logits = torch.zeros(6)
    out = Penalties(presence=0.5, frequency=0.25)([2, 2, 4], logits)
    assert out.tolist() == [0.0, 0.0, -1.0, 0.0, -0.75, 0.0]


def test_api_port_beyond_loopback_needs_a_token() -> None:
    from mcp_server.config import ConfigError, check_serving_security, load_config

    config = load_config(None, {"host": "0.0.0.0", "api_port": 8001}, environ={})
    with pytest.raises(ConfigError, match="API on 0.0.0.0"):
        check_serving_security(config)
    check_serving_security(load_config(None, {"host": "0.0.0.0", "api_port": 8001, "token": "t" * 20}, environ={}))
