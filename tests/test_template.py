"""DeepSeek-V3.1 chat template renderer: byte-identical to the official jinja template, tools block, crash cases,
validation, token ids."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import fixtures_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepseek_mcp.inference.text.template import (
    BOS,
    TOOL_FORMAT_RULES,
    ChatTemplate,
    render_ids,
    render_prompt,
    render_tools,
)

FIXTURES = fixtures_dir()
JINJA_FILE = FIXTURES / "deepseek_v31_chat_template.jinja"
CARD_FILE = FIXTURES / "deepseek_v31_model_card_chat_template.md"
needs_fixtures = pytest.mark.skipif(
    not JINJA_FILE.is_file(), reason=f"official template fixture not found at {JINJA_FILE} (outside this repo's CI)"
)

CARD_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "<think>Hmm</think>I am DeepSeek"},
    {"role": "user", "content": "1+1=?"},
]
CARD_THINKING = ("<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Who are you?<｜Assistant｜></think>I am "
                 "DeepSeek<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>")
CARD_NON_THINKING = CARD_THINKING.removesuffix("<think>") + "</think>"


@pytest.fixture(scope="module")
def official():
    """The official template as transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    if not JINJA_FILE.is_file():
        pytest.skip(f"official template fixture not found at {JINJA_FILE}")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(JINJA_FILE.read_text(encoding="utf-8"))

    def render(messages: list[dict[str, Any]], thinking: bool = False, add_generation_prompt: bool = True) -> str:
        return template.render(messages=messages, thinking=thinking, add_generation_prompt=add_generation_prompt,
                               bos_token=BOS)

    return render


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------------------
# The model card


def test_model_card_examples_exact() -> None:
    assert render_prompt(CARD_MESSAGES, thinking=True) == CARD_THINKING
    assert render_prompt(CARD_MESSAGES, thinking=False) == CARD_NON_THINKING


@needs_fixtures
def test_model_card_fixture_examples_match(official) -> None:
    # The printed outputs in the card fixture, read from the file rather than retyped.
    printed = re.findall(r"# '(<｜begin▁of▁sentence｜>.*?)'$", CARD_FILE.read_text(encoding="utf-8"), re.M)
    assert printed == [CARD_THINKING, CARD_NON_THINKING]
    assert official(CARD_MESSAGES, thinking=True) == CARD_THINKING


# ---------------------------------------------------------------------------------------------------------
# Hand-picked features against the official template


FEATURE_CASES: dict[str, list[dict[str, Any]]] = {
    "systems anywhere": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "S1"}, {"role": "assistant", "content": "b"},
        {"role": "system", "content": "S2"}, {"role": "user", "content": "c"},
    ],
    "reasoning cut at first </think>": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "r1</think>mid</think>ans"},
        {"role": "user", "content": "q2"},
    ],
    "tool calls, null content, chained": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            openai_call("get_weather", '{"city": "Paris"}'), openai_call("get_time", '{"tz":"CET"}')]},
        {"role": "tool", "content": "18C"}, {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "It is 18C</think>x at 12:00"},
        {"role": "user", "content": "thanks"},
    ],
    "tool calls with text content": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Let me check.</think>", "tool_calls": [openai_call("f", "{}")]},
        {"role": "tool", "content": "done"},
    ],
    "prefix assistant": [
        {"role": "user", "content": "write"}, {"role": "assistant", "content": "Once upon", "prefix": True},
    ],
    "prefix after reasoning": [
        {"role": "user", "content": "w"}, {"role": "assistant", "content": "plan</think>Once", "prefix": True},
    ],
    "assistant after assistant": [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a1"},
        {"role": "assistant", "content": "a2</think>b"},
    ],
    "tool_calls None": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x", "tool_calls": None}],
    "only system": [{"role": "system", "content": "sys"}],
    "empty": [],
}


@needs_fixtures
@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_features_match_official(official, name: str, thinking: bool, add_generation_prompt: bool) -> None:
    messages = FEATURE_CASES[name]
    expected = official(messages, thinking, add_generation_prompt)
    assert render_prompt(messages, thinking=thinking, add_generation_prompt=add_generation_prompt) == expected


def test_quirks_spelled_out() -> None:
    calls = [openai_call("f", '{"a": 1}'), openai_call("g", "[]")]
    out = render_prompt([
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "c</think>", "tool_calls": calls},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "x</think>y"},
    ], thinking=True)
    assert out == (
        "<｜begin▁of▁sentence｜><｜User｜>u<｜Assistant｜></think>c</think><｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"a": 1}<｜tool▁call▁end｜><｜tool▁call▁begin｜>g<｜tool▁sep｜>[]'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁output▁begin｜>r1<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>r2<｜tool▁output▁end｜>x</think>y<｜end▁of▁sentence｜>"
    )
    # Nothing is appended after a tool result, even with add_generation_prompt.
    after_tool = render_prompt([{"role": "user", "content": "u"}, {"role": "tool", "content": "r"}])
    assert after_tool.endswith("<｜tool▁output▁end｜>")
    # Thinking + prefix opens with <think>; the generation prompt is not added after an assistant turn.
    prefix = render_prompt([{"role": "user", "content": "u"}, {"role": "assistant", "content": "p", "prefix": True}],
                           thinking=True)
    assert prefix.endswith("<｜User｜>u<｜Assistant｜><think>p<｜end▁of▁sentence｜>")


# ---------------------------------------------------------------------------------------------------------
# Generated conversations against the official template

_PIECES = ["</think>", "<think>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<｜tool▁sep｜>",
           "\n", "\n\n", " ", "{", "}", '"', "<", "｜", "▁", "é", "中", "🙂", "{{", "%}"]
_text = st.lists(st.one_of(st.text(alphabet="abcxyz <>/\n", max_size=5), st.sampled_from(_PIECES)),
                 max_size=5).map("".join)
_name = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=8)
_args = st.one_of(
    st.dictionaries(st.text(alphabet="abc", max_size=3), st.one_of(st.integers(), _text), max_size=3).map(json.dumps),
    _text,
)


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["system", "user", "user", "assistant", "assistant", "calls", "tool", "tool"]))
    if kind == "calls":
        msg = {"role": "assistant", "content": draw(st.one_of(st.none(), _text)),
               "tool_calls": draw(st.lists(st.tuples(_name, _args).map(lambda t: openai_call(*t)),
                                           min_size=1, max_size=3))}
    else:
        msg = {"role": kind, "content": draw(_text)}
        if kind == "assistant":
            extra = draw(st.sampled_from(["none", "prefix", "no-prefix", "tool_calls-null"]))
            if extra == "prefix":
                msg["prefix"] = True
            elif extra == "no-prefix":
                msg["prefix"] = False
            elif extra == "tool_calls-null":
                msg["tool_calls"] = None
    return msg


def _flatten_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Our renderer also takes flat {"name", "arguments"} calls; the official one needs {"function": {...}}.
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [c["function"] for c in m["tool_calls"]]}
        out.append(m)
    return out


@needs_fixtures
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_message(), max_size=9), thinking=st.booleans(), add_generation_prompt=st.booleans(),
       flat=st.booleans())
def test_generated_conversations_match_official(official, messages, thinking, add_generation_prompt, flat) -> None:
    expected = official(messages, thinking, add_generation_prompt)
    ours = _flatten_calls(messages) if flat else messages
    assert render_prompt(ours, thinking=thinking, add_generation_prompt=add_generation_prompt) == expected


# ---------------------------------------------------------------------------------------------------------
# Crash cases of the official template: null content, object arguments


@needs_fixtures
def test_null_content_is_empty_string(official) -> None:
    nulls = [{"role": "system", "content": None}, {"role": "user", "content": None},
             {"role": "assistant", "content": None}, {"role": "user", "content": "u"},
             {"role": "tool", "content": None}]
    empties = [{**m, "content": m["content"] or ""} for m in nulls]
    with pytest.raises(TypeError):
        official(nulls)  # the official template crashes here
    assert render_prompt(nulls) == official(empties)
    # An assistant tool-call turn may omit content entirely.
    no_content = [{"role": "user", "content": "u"}, {"role": "assistant", "tool_calls": [openai_call("f", "{}")]}]
    assert render_prompt(no_content) == official([no_content[0], {**no_content[1], "content": None}])


@needs_fixtures
def test_object_arguments_compact_json_once(official) -> None:
    args = {"city": "Zürich", "days": [1, 2], "nested": {"q": 'say "hi"'}}
    compact = '{"city":"Zürich","days":[1,2],"nested":{"q":"say \\"hi\\""}}'
    assert json.dumps(args, ensure_ascii=False, separators=(",", ":")) == compact
    as_object = [{"role": "user", "content": "u"}, {"role": "assistant", "content": None,
                                                       "tool_calls": [openai_call("f", args)]}]
    as_string = [as_object[0], {**as_object[1], "tool_calls": [openai_call("f", compact)]}]
    with pytest.raises(TypeError):
        official(as_object)  # str + dict in the official template
    text = render_prompt(as_object)
    assert text == official(as_string)
    assert f"<｜tool▁sep｜>{compact}<｜tool▁call▁end｜>" in text
    flat = [as_object[0], {"role": "assistant", "tool_calls": [{"name": "f", "arguments": args}]}]
    assert render_prompt(flat) == text


def test_string_arguments_never_reencoded() -> None:
    spaced = '{"a": 1,  "b": "x"}'
    double_encoded = json.dumps(json.dumps({"a": 1}))  # a JSON string holding JSON, as some histories carry
    for raw in (spaced, double_encoded, "not json at all", ""):
        text = render_prompt([{"role": "user", "content": "u"},
                              {"role": "assistant", "content": None, "tool_calls": [openai_call("f", raw)]}])
        assert f"<｜tool▁sep｜>{raw}<｜tool▁call▁end｜>" in text
    assert '"\\"{' not in render_prompt([{"role": "assistant", "tool_calls": [openai_call("f", {"a": "{}"})]}])


@needs_fixtures
def test_empty_tool_calls_is_a_plain_turn(official) -> None:
    # Documented divergence: the official template writes a lone <｜tool▁calls▁end｜> and drops the content.
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "hello", "tool_calls": []}]
    assert render_prompt(msgs) == official([msgs[0], {"role": "assistant", "content": "hello"}])
    assert "hello" not in official(msgs)


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert render_prompt([{"role": "user", "content": parts}]) == render_prompt([{"role": "user", "content": "Hello"}])


def test_continue_final_message() -> None:
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "Once upon", "prefix": True}]
    assert render_prompt(msgs, thinking=True, continue_final_message=True).endswith(
        "<｜User｜>u<｜Assistant｜><think>Once upon")
    with pytest.raises(ValueError, match="last message to be an assistant"):
        render_prompt(msgs[:1], continue_final_message=True)


# ---------------------------------------------------------------------------------------------------------
# Tools block

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City, e.g. \"Zürich\""}},
                  "required": ["city"]}
EXPECTED_TOOLS_BLOCK = (
    "## Tools\n"
    "You have access to the following tools:\n"
    "\n"
    "### get_weather\n"
    "Description: Current weather — fast.\n"
    "\n"
    'Parameters: {"type": "object", "properties": {"city": {"type": "string", "description": "City, e.g. '
    '\\"Z\\u00fcrich\\""}}, "required": ["city"]}\n'
    "\n"
    "### ping\n"
    "Description: \n"
    "\n"
    'Parameters: {"type": "object", "properties": {}}\n'
    "\n"
    "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>"
    "{{additional_tool_calls}}<｜tool▁calls▁end｜>\n"
    "\n"
    "Where:\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces\n"
)
MCP_TOOLS = [{"name": "get_weather", "description": "Current weather — fast.", "inputSchema": WEATHER_SCHEMA},
             {"name": "ping"}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather — fast.",
                                                  "parameters": WEATHER_SCHEMA}},
                {"type": "function", "function": {"name": "ping", "description": None}}]


def test_tools_block_exact_text() -> None:
    assert render_tools(MCP_TOOLS) == EXPECTED_TOOLS_BLOCK
    assert render_tools(OPENAI_TOOLS) == EXPECTED_TOOLS_BLOCK


def test_tools_block_from_mcp_sdk_objects() -> None:
    mcp_types = pytest.importorskip("mcp.types")
    tools = [mcp_types.Tool(name=t["name"], description=t.get("description"),
                            inputSchema=t.get("inputSchema", {"type": "object", "properties": {}})) for t in MCP_TOOLS]
    assert render_tools(tools) == EXPECTED_TOOLS_BLOCK


@needs_fixtures
def test_tools_block_follows_model_card_text() -> None:
    # The card's fenced block with its placeholders filled in is our one-tool block.
    card = CARD_FILE.read_text(encoding="utf-8")
    block = re.search(r"```\n(## Tools\n.*?)```", card, re.S).group(1)
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    filled = (block.replace("{tool_name1}", "search").replace("{description}", "Look it up")
              .replace("{json.dumps(parameters)}", json.dumps(schema)))
    assert render_tools([{"name": "search", "description": "Look it up", "inputSchema": schema}]) == filled
    assert filled.endswith(TOOL_FORMAT_RULES)


def test_tools_placement() -> None:
    user = [{"role": "user", "content": "hi"}]
    block = render_tools(MCP_TOOLS)
    assert render_prompt(user, tools=MCP_TOOLS) == f"{BOS}{block}<｜User｜>hi<｜Assistant｜></think>"
    with_system = [{"role": "system", "content": "S1"}, *user, {"role": "system", "content": "S2"}]
    assert render_prompt(with_system, tools=MCP_TOOLS) == f"{BOS}S1\n\nS2\n\n{block}<｜User｜>hi<｜Assistant｜></think>"
    assert render_prompt(user, tools=[]) == render_prompt(user)


# ---------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(("messages", "tools", "message"), [
    ([{"role": "user", "content": "u"}, {"role": "bot", "content": "x"}], None, r"messages\[1\]: unknown role 'bot'"),
    ([{"content": "x"}], None, r"messages\[0\]: unknown role None"),
    ([{"role": "user"}], None, r"messages\[0\] \(user\): missing 'content'"),
    ([{"role": "tool", "content": 3}], None, r"messages\[0\] \(tool\): content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], None,
     r"messages\[0\] \(user\): content\[0\] is not a text"),
    ("hello", None, "messages must be a list"),
    (["hello"], None, r"messages\[0\]: expected an object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]: missing tool name"),
    ([{"role": "assistant", "tool_calls": [{"name": "f"}]}], None,
     r"messages\[0\]\.tool_calls\[0\] \(f\): missing 'arguments'"),
    ([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": 5}]}], None,
     r"tool_calls\[0\] \(f\): arguments must be a JSON string or an object, got int"),
    ([{"role": "assistant", "tool_calls": {"name": "f"}}], None,
     r"messages\[0\] \(assistant\): tool_calls must be a list"),
    ([], [{"description": "no name"}], r"tools\[0\]: missing 'name'"),
    ([], [{"name": "a"}, {"name": "a"}], r"tools\[1\]: duplicate tool name 'a'"),
    ([], [{"type": "retrieval", "function": {"name": "a"}}], r"tools\[0\]: unsupported tool type 'retrieval'"),
    ([], [{"name": "a", "inputSchema": "object"}], r"tools\[0\] \(a\): parameters must be a JSON-schema object"),
])
def test_invalid_input_raises_value_error(messages, tools, message) -> None:
    with pytest.raises(ValueError, match=message):
        render_prompt(messages, tools=tools)


# ---------------------------------------------------------------------------------------------------------
# Token ids


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from deepseek_mcp.inference.text.tokenizer import Tokenizer
    except ImportError as e:  # pragma: no cover - the tokenizer module is part of the project
        pytest.skip(f"inference.text.tokenizer not importable: {e}")
    try:
        return Tokenizer.default()
    except FileNotFoundError as e:
        pytest.skip(f"bundled DeepSeek vocabulary unavailable: {e}")


def test_render_ids_special_tokens_single_ids(tokenizer) -> None:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [openai_call("get_weather", {"city": "Paris"})]},
                {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C."},
                {"role": "user", "content": "thanks"}]
    ids = render_ids(messages, tokenizer, tools=MCP_TOOLS, thinking=True)
    text = render_prompt(messages, tools=MCP_TOOLS, thinking=True)
    assert ids[0] == tokenizer.bos_id == 0
    assert ids.count(0) == 1
    assert tokenizer.decode(ids) == text
    special = {"<｜User｜>": 128803, "<｜Assistant｜>": 128804, "</think>": 128799, "<think>": 128798,
               "<｜end▁of▁sentence｜>": 1, "<｜tool▁calls▁begin｜>": 128806, "<｜tool▁calls▁end｜>": 128807,
               "<｜tool▁call▁begin｜>": 128808, "<｜tool▁call▁end｜>": 128809, "<｜tool▁output▁begin｜>": 128812,
               "<｜tool▁output▁end｜>": 128813, "<｜tool▁sep｜>": 128814}
    for token, tid in special.items():
        assert tokenizer.encode(token) == [tid], token
    # Each control string in the text became exactly one id (the tools block holds some of them too).
    for token, tid in special.items():
        assert ids.count(tid) == text.count(token), token
    assert ids[-1] == 128798  # the thinking generation prompt ends with <think>


def test_render_ids_rejects_tokenizer_adding_bos(tokenizer) -> None:
    class AddsBos:
        bos_id = tokenizer.bos_id

        def encode(self, text: str) -> list[int]:
            return [tokenizer.bos_id, *tokenizer.encode(text)]

    with pytest.raises(RuntimeError, match="added or dropped a BOS"):
        render_ids(CARD_MESSAGES, AddsBos())


# ---------------------------------------------------------------------------------------------------------
# Template selection


@needs_fixtures
def test_chat_template_selection(tmp_path: Path) -> None:
    source = JINJA_FILE.read_text(encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": source, "bos_token": {"content": BOS}, "eos_token": "<｜end▁of▁sentence｜>"}),
        encoding="utf-8")
    default = ChatTemplate.from_checkpoint(tmp_path)
    checkpoint = ChatTemplate.from_checkpoint(tmp_path, use_checkpoint_template=True)
    assert (default.kind, checkpoint.kind) == ("python", "jinja")
    for thinking in (False, True):
        assert checkpoint.render(CARD_MESSAGES, thinking=thinking) == default.render(CARD_MESSAGES, thinking=thinking)
    # The checkpoint's template is taken as it is: it crashes on null content, and we say so.
    with pytest.raises(ValueError, match="checkpoint's chat template failed"):
        checkpoint.render([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="no chat_template"):
        ChatTemplate.from_checkpoint(tmp_path / "missing", use_checkpoint_template=True)


def test_chat_template_is_sandboxed() -> None:
    evil = ChatTemplate("{{ messages.append(1) }}{{ messages }}")
    with pytest.raises(ValueError, match="chat template failed"):
        evil.render([{"role": "user", "content": "u"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% if %}")
