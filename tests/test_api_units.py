"""The API's stream assemblers on recorded V3.1 outputs, re-chunked at every boundary: the joined OpenAI deltas
and Anthropic events equal the non-streamed message built from the same text, whatever the token boundaries.
Also the request mapping (thinking switches, tools, Anthropic history) and the penalties processor."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import torch

from deepseek_mcp.inference.text.parse import StreamParser, parse
from deepseek_mcp.inference.text.template import (
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
)
from deepseek_mcp.inference.text.template import TOOL_SEP as SEP
from deepseek_mcp.mcp_server.api import anthropic_messages, openai_chat
from deepseek_mcp.mcp_server.api.anthropic_stream import MessageStream
from deepseek_mcp.mcp_server.api.errors import ApiError
from deepseek_mcp.mcp_server.api.openai_stream import event_deltas
from deepseek_mcp.mcp_server.api.requests import ChatCompletionRequest, MessagesRequest
from deepseek_mcp.mcp_server.engine_request import RunResult
from deepseek_mcp.mcp_server.pipeline import Choice, Plan, call_limit
from deepseek_mcp.mcp_server.request_processors import Penalties


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
    # arguments that are not a JSON object (possible only unconstrained): malformed, and cut off
    (block(("get_weather", '{"city": "Par')), False),
    (TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "count" + SEP + '{"n": 1', False),
]


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    return out


def fake_choice(text: str, thinking: bool, plan: Plan) -> Choice:
    parsed = parse(text, thinking=thinking, tools=["get_weather", "count"])
    calls = parsed.tool_calls[:call_limit(plan)]
    run = RunResult([1] * 5, text, "stop", 10, 0, 0.1)
    return Choice(0, run, parsed, calls, [f"call_{i}" for i in range(len(calls))], 0, False)


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
            await stream.on_item(0, (p, parser.feed(p), []))
        await stream.on_item(0, ("", parser.finish(), []))
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
        assert all(b["input"] == {} for b in blocks if b["type"] == "tool_use")  # the whole input in one delta
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


def test_anthropic_prefill_mapping_and_refusals() -> None:
    def plan(last: Any, **kw: Any) -> Plan:
        return anthropic_messages.messages_plan(MessagesRequest.model_validate(
            {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}, last], **kw}))

    p = plan({"role": "assistant", "content": [{"type": "text", "text": "The answer"}]})
    assert p.continue_final and p.messages[-1] == {"role": "assistant", "content": "The answer", "prefix": True}
    assert not anthropic_messages.messages_plan(MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})).continue_final
    with pytest.raises(ApiError, match="thinking enabled") as e:
        plan({"role": "assistant", "content": "x"}, thinking={"type": "enabled", "budget_tokens": 4})
    assert e.value.param == "messages.1"
    with pytest.raises(ApiError, match="only text"):
        plan({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "w", "input": {}}]})


def test_penalties_processor() -> None:
    logits = torch.zeros(6)
    out = Penalties(presence=0.5, frequency=0.25)([2, 2, 4], logits)
    assert out.tolist() == [0.0, 0.0, -1.0, 0.0, -0.75, 0.0]


def test_api_port_beyond_loopback_needs_a_token() -> None:
    from deepseek_mcp.mcp_server.config import ConfigError, check_serving_security, load_config

    config = load_config(None, {"host": "0.0.0.0", "api_port": 8001}, environ={})
    with pytest.raises(ConfigError, match="API on 0.0.0.0"):
        check_serving_security(config)
    check_serving_security(load_config(None, {"host": "0.0.0.0", "api_port": 8001, "token": "t" * 20}, environ={}))


def test_invalid_tool_arguments_are_an_empty_input_in_both_anthropic_shapes() -> None:
    # a call whose arguments are not a JSON object keeps its tool_use block, with input {} in the message and
    # one input_json_delta "{}" in the stream (never the raw text, which the client could not parse)
    for text in (block(("get_weather", '{"city": "Par')), block(("count", "[1, 2]"))):
        plan = Plan()
        choice = fake_choice(text, False, plan)
        want = anthropic_messages.message_response(plan, choice, "m", "msg_1")
        assert [b["input"] for b in want["content"] if b["type"] == "tool_use"] == [{}]
        assert want["stop_reason"] == "tool_use"
        blocks = assemble_anthropic([text[:len(text) // 2], text[len(text) // 2:]], False, plan, choice)
        assert [b["partial"] for b in blocks if b["type"] == "tool_use"] == ["{}"]


class _Tok:
    """A byte-level tokenizer of a few pieces (id 0 is EOS)."""

    eos_id = 0
    PIECES = {0: b"", 1: b"Hel", 2: b"lo <", 3: b"b> ", 4: "\u00e9".encode()[:1], 5: "\u00e9".encode()[1:],
              6: b"!", 7: b"</think>"}

    def incremental_decoder(self) -> Any:
        import codecs

        pieces, utf8 = self.PIECES, codecs.getincrementaldecoder("utf-8")(errors="replace")

        class Decoder:
            def step(self, t: int) -> str:
                return utf8.decode(pieces[t])

            def flush(self) -> str:
                return utf8.decode(b"", final=True)

        return Decoder()


class _Recorder:
    def entries(self, token_ids: list[int], start: int = 0) -> list[tuple[int, float, list[tuple[int, float]]]]:
        return [(t, -float(k), []) for k, t in enumerate(token_ids[start:], start)]


@pytest.mark.parametrize("thinking", [False, True])
def test_stream_logprobs_each_token_once_with_the_text_that_completes_it(thinking: bool) -> None:
    # service.run's feeding, simulated: the parser holds "<" back (a possible marker), the decoder an
    # unfinished character; EOS has no text and no delta. Each entry is handed out once, in order, only once
    # its text is resolved; what is left (EOS) is the final chunk's, and all of them are the non-streamed list.
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.mcp_server.logprobs import StreamLogprobs, all_logprobs

    tok, params = _Tok(), SamplingParams(max_tokens=16)
    tokens = ([7] if thinking else []) + [1, 2, 3, 4, 5, 6, 0]
    live = StreamLogprobs(_Recorder(), tok, params)  # type: ignore[arg-type]
    decoder, parser = tok.incremental_decoder(), StreamParser(thinking=thinking)
    ids: list[int] = []
    fed, text, taken = 0, "", []
    for t in tokens:
        ids = [*ids, t]
        delta = decoder.flush() if t == 0 else decoder.step(t)
        if not delta:
            continue  # run_request calls on_text only for a text delta
        events = parser.feed(delta)
        fed += len(delta)
        text += "".join(getattr(e, "text", "") for e in events)
        got = live.take(ids, fed - parser.held_back)
        taken.append(([e.token_id for e in got], text))
    want = all_logprobs(_Recorder(), tok, params, ids, fed)  # type: ignore[arg-type]
    first = [7] if thinking else []
    assert taken == [*([([7], "")] if thinking else []), ([1], "Hel"), ([], "Hello "), ([2, 3], "Hello <b> "),
                     ([4, 5], "Hello <b> \u00e9"), ([6], "Hello <b> \u00e9!")]
    rest = want[sum(len(ids_) for ids_, _ in taken):]
    assert [e.token_id for e in rest] == [0]
    assert [e.token_id for e in want] == [*first, 1, 2, 3, 4, 5, 6, 0]
    shift = 8 if thinking else 0  # offsets count the raw output text, </think> included
    assert [e.offset - shift for e in want][len(first):] == [0, 3, 7, 10, 10, 11, 12]


def test_stream_logprobs_ride_the_delta_that_ends_their_text() -> None:
    # one parser step that yields reasoning and then answer text (a stop string's hold-back releases several
    # tokens at once): each delta carries the tokens whose text ends within it, the marker rides the next
    from deepseek_mcp.mcp_server.api.openai_stream import ChunkStream
    from deepseek_mcp.mcp_server.logprobs import TokenLogprob

    class Tok:
        def decode(self, ids: list[int]) -> str:
            return {1: "abc", 2: THINK_END, 3: "de"}[ids[0]]

    text = "abc" + THINK_END + "de"
    entries = [TokenLogprob(1, -0.1, [], 0, 3), TokenLogprob(2, -0.2, [], 3, 3 + len(THINK_END)),
               TokenLogprob(3, -0.3, [], 3 + len(THINK_END), len(text))]
    chunks: list[dict[str, Any]] = []

    async def write(data: bytes) -> None:
        if data.startswith(b"data: {"):
            chunks.append(json.loads(data[6:]))

    async def main() -> None:
        stream = ChunkStream(Plan(thinking=True, logprobs=0), "m", "id", write, False, Tok())
        parser = StreamParser(thinking=True)
        await stream.on_item(0, (text, parser.feed(text), entries))
        await stream.on_item(0, ("", parser.finish(), []))

    anyio.run(main)
    got = [(c["choices"][0]["delta"], [e["token"] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])])
           for c in chunks]
    assert got == [({"reasoning_content": "abc", "reasoning": "abc"}, ["abc"]),
                   ({"content": "de"}, [THINK_END, "de"])]


def test_one_finish_vocabulary_mapped_by_each_front_end() -> None:
    """Inside, `RunResult.finish_reason` (stop | length | time | cancelled) and the matched stop; each wire
    format maps them, and the stop sequence is the engine's match, never re-derived from the text."""
    from deepseek_mcp.mcp_server.api import completions

    plan = Plan()
    cases = [  # (finish, stop matched, text) -> (OpenAI chat, completions, Anthropic stop_reason, stop_sequence)
        ("stop", 1, "Hi.", ("stop", "stop", "end_turn", None)),
        ("stop", "END", "Hi.", ("stop", "stop", "stop_sequence", "END")),
        ("length", None, "Hi", ("length", "length", "max_tokens", None)),
        ("time", None, "Hi", ("length", "length", "max_tokens", None)),
        ("cancelled", None, "Hi", ("stop", "stop", "end_turn", None)),
        ("stop", "END", block(("count", "{}")), ("tool_calls", "stop", "tool_use", None)),
    ]
    for finish, stop, text, want in cases:
        c = fake_choice(text, False, plan)
        c.run = RunResult([1] * 5, text, finish, 10, 0, 0.1, stop=stop if finish == "stop" else None)
        got = (openai_chat.finish_reason(c), completions.finish(c), anthropic_messages.stop_reason(c),
               c.stop_sequence)
        assert got == want, (finish, stop, got)


def test_reasoning_tokens_one_count() -> None:
    """Tokens before `</think>` (not counted), else all but a final EOS: the same for every front end."""
    from deepseek_mcp.mcp_server.pipeline import reasoning_tokens

    assert reasoning_tokens([5, 6, 9, 7, 1], 9, 1) == 2
    assert reasoning_tokens([5, 6, 7, 1], 9, 1) == 3
    assert reasoning_tokens([5, 6, 7], 9, 1) == 3
    assert reasoning_tokens([], 9, 1) == 0
