"""Streaming DeepSeek-V3.1 output parser: chunking invariance, losslessness, tool-call failure cases."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepseek_mcp.inference.text.parse import (
    ALL_MARKERS,
    ContentDelta,
    ParseResult,
    ReasoningDelta,
    SearchDelta,
    SearchFinished,
    StreamParser,
    ToolArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
    parse,
)
from deepseek_mcp.inference.text.template import render_prompt

CB, CE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
B, E, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
EOS = "<｜end▁of▁sentence｜>"
SB, SE = "<｜search▁begin｜>", "<｜search▁end｜>"


def call(name: str, args: str) -> str:
    return f"{B}{name}{SEP}{args}{E}"


# (output text, thinking, offered tools)
SAMPLES: list[tuple[str, bool, list[str] | None]] = [
    ("Hello <b>world</b> a<b", False, None),
    ("I should check.</think>The answer is 4." + EOS, True, None),
    ("Checking." + CB + call("get_weather", '{"city": "Paris",\n "note": "a<b {x} \\"q\\""}')
     + call("get_time", '{"tz":"CET"}') + CE + EOS, False, ["get_weather", "get_time"]),
    ("Need the weather." + CB + call("get_weather", '{"city": "Oslo"}') + CE + "</think>Done.", True, ["get_weather"]),
    (CB + call("f", "{}") + CE + " and text after the block", False, ["f"]),
    ("x" + CB + call("f", '{"a": 1, "b": [1, 2'), False, ["f"]),  # max tokens mid-call
    (CB + call("nope", '{"a": 1}') + CE, False, ["f"]),
    (CB + call("f", "{'a': 1}") + CE, False, None),
    (CB + call("f", json.dumps(json.dumps({"a": 1}))) + CE, False, ["f"]),
    ("plain</think>still content<think>", False, None),
    ("Let me search." + SB + "deepseek v3.1 release" + SE + "Found it.</think>ok", True, None),
    (B + "f" + SEP + '{"a": 2}' + E + "after", False, ["f"]),  # bare call, no block opener
    ("<｜tool calls begin｜>" + call("f", "{}") + "<｜tool calls end｜>", False, None),  # spelled-out variant
    (CB + call("f", '{"a": 1}') + B + "g" + SEP + '{"b": 2}' + CE, False, None),  # missing call end
    (CB + B + "f" + E + CE, False, None),  # no separator
    ("<｜tool▁" + "calls" + "<<｜" + CB + B, True, None),
]


def feed_all(chunks: list[str], thinking: bool, tools: list[str] | None) -> tuple[ParseResult, list, StreamParser]:
    parser = StreamParser(thinking, tools)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser.result(), events, parser


def check_consistent(text: str, result: ParseResult, events: list, parser: StreamParser) -> None:
    """Nothing lost; the event stream adds up to the final result."""
    assert parser.reassemble() == text
    kinds: dict[str, str] = {}
    for kind, piece in parser.segments():
        kinds[kind] = kinds.get(kind, "") + piece
    assert kinds.get("reasoning", "") == result.reasoning
    assert kinds.get("content", "") == result.content
    assert kinds.get("tool_args", "") == "".join(c.raw for c in result.tool_calls)
    assert kinds.get("search", "") == "".join(s.text for s in result.searches)
    assert set(kinds) <= {"reasoning", "content", "marker", "tool_name", "tool_args", "search"}
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == result.reasoning
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == result.content
    assert "".join(e.text for e in events if isinstance(e, SearchDelta)) == "".join(s.text for s in result.searches)
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [e.call for e in finished] == result.tool_calls
    assert [e.search for e in events if isinstance(e, SearchFinished)] == result.searches
    for i, tool_call in enumerate(result.tool_calls):
        mine = [e for e in events if getattr(e, "index", None) == i and not isinstance(e, (SearchDelta, SearchFinished))
                and type(e).__name__.startswith("Tool")]
        assert isinstance(mine[0], ToolCallStarted) and mine[0].name == tool_call.name
        assert isinstance(mine[-1], ToolCallFinished)
        assert "".join(e.text for e in mine if isinstance(e, ToolArgumentsDelta)) == tool_call.raw


# ---------------------------------------------------------------------------------------------------------
# Splitting invariance


@pytest.mark.parametrize(("text", "thinking", "tools"), SAMPLES)
def test_every_split_point_and_one_char_chunks(text: str, thinking: bool, tools: list[str] | None) -> None:
    whole, events, parser = feed_all([text], thinking, tools)
    check_consistent(text, whole, events, parser)
    for k in range(len(text) + 1):
        result, events, parser = feed_all([text[:k], text[k:]], thinking, tools)
        assert result == whole, k
        check_consistent(text, result, events, parser)
    result, events, parser = feed_all(list(text), thinking, tools)
    assert result == whole
    check_consistent(text, result, events, parser)


@pytest.mark.parametrize(("text", "thinking", "tools"), SAMPLES)
def test_random_chunkings(text: str, thinking: bool, tools: list[str] | None) -> None:
    rng = random.Random()  # fresh chunkings each run; the failing split is printed by the assert
    whole = parse(text, thinking=thinking, tools=tools)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(8, len(text) - 1))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        result, events, parser = feed_all(chunks, thinking, tools)
        assert result == whole, chunks
        check_consistent(text, result, events, parser)


_FRAGMENTS = [*ALL_MARKERS, "<", "｜", "▁", "<｜", "<｜tool▁", "calls▁begin｜>", "call▁end｜>", "</", "think>",
              "<think>", "{", "}", '"', "\n", "{}", '{"a": 1}', "é", "🙂", "｜>"]
_fuzz_text = st.lists(st.one_of(st.text(max_size=4), st.sampled_from(_FRAGMENTS)), max_size=24).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_fuzz_text, thinking=st.booleans(), tools=st.one_of(st.none(), st.just(["f", "get_weather"])),
       data=st.data())
def test_fuzz_never_raises_never_loses(text: str, thinking: bool, tools, data) -> None:
    whole = parse(text, thinking=thinking, tools=tools)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=10))))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    result, events, parser = feed_all(chunks, thinking, tools)
    assert result == whole
    check_consistent(text, result, events, parser)
    for tool_call in result.tool_calls:
        assert tool_call.valid == (tool_call.error is None)
        assert tool_call.complete or (not tool_call.valid and tool_call.arguments is None)
    json.dumps(result.to_dict())  # the result is plain JSON data


# ---------------------------------------------------------------------------------------------------------
# Behaviour


def test_reasoning_content_and_calls() -> None:
    text = SAMPLES[2][0]
    result = parse(text, tools=["get_weather", "get_time"])
    assert (result.reasoning, result.content, result.complete) == ("", "Checking.", True)
    assert [(c.name, c.arguments, c.valid) for c in result.tool_calls] == [
        ("get_weather", {"city": "Paris", "note": 'a<b {x} "q"'}, True), ("get_time", {"tz": "CET"}, True)]
    assert result.tool_calls[0].raw == '{"city": "Paris",\n "note": "a<b {x} \\"q\\""}'
    thinking = parse("I should check.</think>The answer is 4." + EOS, thinking=True)
    assert (thinking.reasoning, thinking.content) == ("I should check.", "The answer is 4.")


def test_tool_call_inside_reasoning_and_text_after_block() -> None:
    result = parse(SAMPLES[3][0], thinking=True, tools=["get_weather"])
    assert result.reasoning == "Need the weather."
    assert result.content == "Done."
    assert result.tool_calls[0].in_reasoning and result.tool_calls[0].valid
    after = parse(SAMPLES[4][0], tools=["f"])
    assert after.content == " and text after the block"
    assert after.tool_calls[0].arguments == {}


def test_unterminated_call_streams_raw_text_never_empty_object() -> None:
    parser = StreamParser(False, ["f"])
    events = []
    for ch in "Sure." + CB + B + "f" + SEP + '{"path": "/tmp/x", "lines": [1, ':
        events += parser.feed(ch)
    assert [e.name for e in events if isinstance(e, ToolCallStarted)] == ["f"]
    pieces = [e.text for e in events if isinstance(e, ToolArgumentsDelta)]
    assert "".join(pieces) == '{"path": "/tmp/x", "lines": [1, '
    assert "{}" not in pieces
    open_call = parser.result().tool_calls[0]
    assert (open_call.complete, open_call.valid, open_call.arguments) == (False, False, None)
    final = parser.finish()
    assert isinstance(final[-1], ToolCallFinished)
    result = parser.result()
    assert result.complete is False
    assert result.tool_calls[0].raw == '{"path": "/tmp/x", "lines": [1, '
    assert result.tool_calls[0].arguments is None
    assert "unterminated tool call" in result.tool_calls[0].error
    assert result.to_dict()["tool_calls"][0]["arguments"] is None


def test_invalid_json_unknown_name_and_double_encoding() -> None:
    bad = parse(CB + call("f", "{'a': 1}") + CE).tool_calls[0]
    assert (bad.valid, bad.arguments, bad.raw) == (False, None, "{'a': 1}")
    assert bad.error.startswith("arguments are not valid JSON: Expecting property name")
    unknown = parse(CB + call("nope", '{"a": 1}') + CE, tools=["f"]).tool_calls[0]
    assert (unknown.valid, unknown.arguments) == (False, {"a": 1})
    assert unknown.error == "unknown tool 'nope' (offered: f)"
    doubled = parse(CB + call("f", json.dumps(json.dumps({"a": 1}))) + CE, tools=["f"]).tool_calls[0]
    assert (doubled.valid, doubled.arguments) == (True, {"a": 1})
    not_object = parse(CB + call("f", "[1, 2]") + CE).tool_calls[0]
    assert (not_object.valid, not_object.arguments, not_object.error) == (
        False, [1, 2], "arguments must be a JSON object, got array")
    empty = parse(CB + call("f", "  ") + CE).tool_calls[0]
    assert (empty.valid, empty.error) == (False, "empty arguments: expected a JSON object")
    no_sep = parse(CB + B + "f" + E + CE).tool_calls[0]
    assert not no_sep.valid and "no <｜tool▁sep｜>" in no_sep.error


def test_tolerated_variants() -> None:
    bare = parse(SAMPLES[11][0], tools=["f"])
    assert (bare.content, bare.tool_calls[0].arguments, bare.complete) == ("after", {"a": 2}, True)
    spelled = parse(SAMPLES[12][0])
    assert (spelled.content, spelled.tool_calls[0].valid) == ("", True)
    missing_end = parse(SAMPLES[13][0])
    assert [(c.name, c.arguments, c.valid) for c in missing_end.tool_calls] == [("f", {"a": 1}, True),
                                                                                ("g", {"b": 2}, True)]
    two_blocks = parse(CB + call("f", "{}") + CE + CB + call("g", "{}") + CE)
    assert [c.name for c in two_blocks.tool_calls] == ["f", "g"] and two_blocks.content == ""


def test_think_markers_and_search() -> None:
    # Non-thinking: </think> and <think> are content text (documented decision).
    assert parse("plain</think>still content<think>").content == "plain</think>still content<think>"
    # Thinking: only the first </think> ends reasoning; a later one is content.
    assert parse("r</think>c</think>d", thinking=True).content == "c</think>d"
    result = parse(SAMPLES[10][0], thinking=True)
    assert result.reasoning == "Let me search.Found it."
    assert [(s.text, s.complete, s.in_reasoning) for s in result.searches] == [("deepseek v3.1 release", True, True)]
    open_search = parse("x" + SB + "query", thinking=True)
    assert open_search.searches[0].complete is False and open_search.complete is False
    assert parse("done" + EOS).content == "done"


def test_holds_back_only_a_marker_prefix() -> None:
    parser = StreamParser(False)
    assert parser.feed("abc<｜tool▁") == [ContentDelta("abc")]
    assert parser.segments()[-1] == ("held", "<｜tool▁")
    assert parser.feed("x") == [ContentDelta("<｜tool▁x")]
    assert parser.feed("a<b ") == [ContentDelta("a<b ")]
    assert parser.feed("<") == []
    assert parser.finish() == [ContentDelta("<")]
    # In non-thinking mode </think> is not a marker, so it is not held back either.
    assert StreamParser(False).feed("</thi") == [ContentDelta("</thi")]
    assert StreamParser(True).feed("</thi") == []


def test_marker_table_properties() -> None:
    # The hold-back logic relies on: every marker has one '<', at its start, and none is a prefix of another.
    for m in ALL_MARKERS:
        assert m.startswith("<") and m.count("<") == 1, m
        assert not any(o != m and o.startswith(m) for o in ALL_MARKERS), m


def test_feed_after_finish_and_empty_input() -> None:
    parser = StreamParser(True, ["f"])
    assert parser.feed("") == []
    assert parser.finish() == [] and parser.finish() == []
    assert parser.result() == ParseResult("", "", [], [], True)
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")
    assert StreamParser(False).result().complete is False  # not finished yet


def test_round_trip_through_the_template() -> None:
    # What the renderer writes for an assistant tool-call turn parses back into the same calls.
    calls = [{"name": "get_weather", "arguments": {"city": "Zürich", "text": "a\n<b>{c}"}},
             {"name": "get_time", "arguments": '{"tz": "CET"}'}]
    prompt = render_prompt([{"role": "user", "content": "u"},
                            {"role": "assistant", "content": "Checking.", "tool_calls": calls}])
    output = prompt.split("<｜Assistant｜></think>", 1)[1]
    result = parse(output, tools=["get_weather", "get_time"])
    assert result.content == "Checking." and result.complete
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_weather", {"city": "Zürich", "text": "a\n<b>{c}"}), ("get_time", {"tz": "CET"})]
