"""MCP server pieces that need no model: configuration, CLI, tool specs, conversations, progress, JSON-RPC errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from deepseek_mcp.mcp_server.__main__ import build_parser, main, overrides
from deepseek_mcp.mcp_server.config import ConfigError, ServerConfig, check_serving_security, is_loopback, load_config
from deepseek_mcp.mcp_server.conversations import Conversation, ConversationStore, UnknownConversation
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.schemas import McpTool, Message, NamedToolChoice, OpenAITool, ToolCallIn, ToolCallInput
from deepseek_mcp.mcp_server.tool_specs import BadToolSpec, check_call, normalize_choice, normalize_tools
from deepseek_mcp.mcp_server.transports import _jsonrpc_error, security_settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "deepseek-mcp"


# ------------------------------------------------------------------------------------------- configuration


def test_example_config_mirrors_the_model() -> None:
    raw = json.loads((ROOT / "config.example.json").read_text())
    assert raw == ServerConfig().model_dump()  # every key, every default
    assert load_config(ROOT / "config.example.json", environ={}) == ServerConfig()


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"modle": "x", "limits": {"max_token": 5}, "port": "eighty"}))
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    msg = str(e.value)
    assert "unknown key(s) limits.max_token, modle" in msg and str(path) in msg
    assert "port" in msg  # the type error is reported too


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json", environ={})


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"token": "from-file", "port": 9001, "limits": {"max_tokens": 7, "load_wait_s": 3}}))
    args = build_parser().parse_args(["--max-wall-time", "12", "--port", "9002"])
    cfg = load_config(path, overrides(args), environ={"DEEPSEEK_MCP_TOKEN": "from-env"})
    assert cfg.token == "from-env" and cfg.port == 9002
    assert (cfg.limits.max_tokens, cfg.limits.load_wait_s, cfg.limits.max_wall_time_s) == (7, 3, 12)  # deep merge
    args = build_parser().parse_args(["--token", "from-flag", "--max-tokens", "0"])
    with pytest.raises(ConfigError, match="command line: limits.max_tokens"):
        load_config(path, overrides(args), environ={})
    cfg = load_config(None, overrides(build_parser().parse_args(["--token", "t"])), environ={"DEEPSEEK_MCP_TOKEN": "e"})
    assert cfg.token == "t"


def test_every_config_key_has_a_flag() -> None:
    help_text = build_parser().format_help()
    flags = {"model", "device", "dtype", "kernels", "cache_tokens", "max_num_seqs", "transport", "host", "port",
             "path", "token", "log_level", "temperature", "top_p", "top_k", "max_tokens", "thinking_budget",
             "max_conversations"}
    for key in flags:
        assert "--" + key.replace("_", "-") in help_text, key
    assert "--allowed-host" in help_text and "--allowed-origin" in help_text and "--max-wall-time" in help_text


def test_non_loopback_needs_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")
    check_serving_security(ServerConfig(transport="stdio", host="0.0.0.0"))
    check_serving_security(ServerConfig(transport="http", host="0.0.0.0", token="s"))
    with pytest.raises(ConfigError, match="needs a bearer token"):
        check_serving_security(ServerConfig(transport="sse", host="0.0.0.0"))


def test_main_refuses_without_loading_anything(capsys: pytest.CaptureFixture[str]) -> None:
    env_token = os.environ.pop("DEEPSEEK_MCP_TOKEN", None)
    try:
        assert main(["--transport", "http", "--host", "0.0.0.0"]) == 2
    finally:
        if env_token is not None:
            os.environ["DEEPSEEK_MCP_TOKEN"] = env_token
    out = capsys.readouterr()
    assert out.out == "" and "needs a bearer token" in out.err


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_console_script_help_and_bad_config(tmp_path: Path) -> None:
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--transport {stdio,http,sse}" in done.stdout and "--kernels" in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transport": "stdio", "bogus": 1}))
    done = subprocess.run([str(SCRIPT), "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown key(s) bogus" in done.stderr and "Traceback" not in done.stderr


def test_dns_rebinding_settings() -> None:
    s = security_settings(ServerConfig(transport="http"))
    assert s.enable_dns_rebinding_protection
    assert "127.0.0.1:*" in s.allowed_hosts and "localhost:*" in s.allowed_hosts
    assert "http://localhost:*" in s.allowed_origins and not any("evil" in o for o in s.allowed_origins)
    s = security_settings(ServerConfig(transport="http", allowed_origins=["https://app.example"],
                                       allowed_hosts=["mcp.example:443"]))
    assert "https://app.example" in s.allowed_origins and "mcp.example:443" in s.allowed_hosts


# -------------------------------------------------------------------------------------------- tool specs


def _tools(*raw: dict) -> list[McpTool | OpenAITool]:
    return ToolCallInput.model_validate({"prompt": "x", "tools": list(raw)}).tools


def test_tool_shapes_normalize_alike() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    mcp, openai, plain = _tools(
        {"name": "a", "description": "A", "inputSchema": schema, "annotations": {"readOnlyHint": True}},
        {"type": "function", "function": {"name": "b", "description": "B", "parameters": schema}},
        {"name": "c", "parameters": schema},
    )
    specs = normalize_tools([mcp, openai, plain])
    assert [(s.name, s.parameters) for s in specs] == [("a", schema), ("b", schema), ("c", schema)]
    assert specs[1].as_openai()["function"]["description"] == "B"


@pytest.mark.parametrize(
    ("tool", "needle"),
    [
        ({"name": "t", "inputSchema": {"type": "object", "properties": {"x": {"type": "strin"}}}},
         "not valid JSON Schema at properties/x/type"),
        ({"name": "t", "inputSchema": {"type": "object", "required": "x"}}, "not valid JSON Schema at required"),
        ({"name": "t", "inputSchema": {"type": "array"}}, "must describe an object"),
        ({"name": "bad name", "inputSchema": {"type": "object"}}, "rename the tool"),
    ],
)
def test_bad_tool_specs(tool: dict, needle: str) -> None:
    with pytest.raises(BadToolSpec, match="tools\\[0\\]") as e:
        normalize_tools(_tools(tool))
    assert needle in str(e.value)


def test_duplicate_names_and_tool_choice() -> None:
    t = {"name": "t", "inputSchema": {"type": "object"}}
    with pytest.raises(BadToolSpec, match="duplicate"):
        normalize_tools(_tools(t, t))
    specs = normalize_tools(_tools(t))
    assert normalize_choice("required", specs).forces_call
    assert normalize_choice(NamedToolChoice.model_validate({"name": "t"}), specs).name == "t"
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "t"}})
    assert normalize_choice(named, specs).name == "t"
    with pytest.raises(BadToolSpec, match="not among the tools given"):
        normalize_choice(NamedToolChoice(name="u"), specs)


def test_check_call_against_schema() -> None:
    spec = normalize_tools(_tools({"name": "w", "inputSchema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}))[0]
    specs = {"w": spec}
    assert check_call("w", {"n": 3}, specs) == ({"n": 3}, "")
    assert check_call("w", '{"n": 3}', specs) == ({"n": 3}, "")
    args, err = check_call("w", {"n": "three"}, specs)
    assert args is None and "schema at n" in err
    args, err = check_call("w", {}, specs)
    assert args is None and "'n' is a required property" in err
    assert "unknown tool 'x'" in check_call("x", {}, specs)[1]
    assert "not valid JSON" in check_call("w", "{n:", specs)[1]
    assert "JSON object" in check_call("w", [1], specs)[1]


def test_message_shapes() -> None:
    call = ToolCallIn.model_validate({"id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a": 1}'}})
    assert (call.name, call.arguments) == ("f", {"a": 1})
    Message.model_validate({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    for bad, needle in [({"role": "user", "content": "x", "tool_calls": []}, "only allowed on role 'assistant'"),
                        ({"role": "user"}, "content is required"),
                        ({"role": "robot", "content": "x"}, "role"),
                        ({"role": "user", "content": "x", "extra": 1}, "Extra inputs")]:
        with pytest.raises(ValueError, match=needle):
            Message.model_validate(bad)
    with pytest.raises(ValueError, match="not valid JSON"):
        ToolCallIn.model_validate({"name": "f", "arguments": "{oops"})


# ------------------------------------------------------------------------------ conversations and progress


def test_conversation_store_is_a_bounded_lru() -> None:
    store = ConversationStore(capacity=2)
    ids = [store.new_id() for _ in range(3)]
    assert len(set(ids)) == 3
    store.put(Conversation(ids[0], "sys", [{"role": "user", "content": "a"}]))
    store.put(Conversation(ids[1]))
    snapshot = store.get(ids[0])  # touch: ids[1] is now least recent
    snapshot.messages.append({"role": "user", "content": "mutated"})
    assert store.get(ids[0]).messages == [{"role": "user", "content": "a"}]  # a copy, not the stored list
    store.put(Conversation(ids[2]))
    with pytest.raises(UnknownConversation):
        store.get(ids[1])
    assert store.remove(ids[0]) == 1 and len(store) == 1
    with pytest.raises(UnknownConversation):
        store.remove(ids[0])


def test_progress_strictly_increases_and_survives_send_errors() -> None:
    sent: list[tuple[float, float | None, str | None]] = []

    async def send(p: float, t: float | None, m: str | None) -> None:
        if m == "boom":
            raise RuntimeError("stream closed")
        sent.append((p, t, m))

    async def go() -> None:
        prog = Progress(send)
        for value, msg in [(0, "load"), (0, "load"), (0, "boom"), (3, "gen"), (3, "gen"), (2, "gen"), (5, "gen")]:
            await prog.update(value, 8, msg)
        await Progress(None).update(1, 2, "nobody listens")

    anyio.run(go)
    values = [p for p, _, _ in sent]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[0] == 0 and values[2] == 3 and values[-1] == 5 and len(sent) == 6


def test_jsonrpc_errors_for_bad_lines() -> None:
    import mcp_types as types

    def error_for(line: str) -> dict:
        try:
            types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        except Exception as e:  # noqa: BLE001
            return json.loads(_jsonrpc_error(e).message.model_dump_json(by_alias=True, exclude_unset=True))
        raise AssertionError("line parsed")

    assert error_for("{oops") == {"jsonrpc": "2.0", "id": None,
                                  "error": {"code": -32700, "message": "Parse error: the line is not valid JSON"}}
    bad = error_for('{"jsonrpc": "2.0", "id": 7, "method": 5}')
    assert bad["id"] == 7 and bad["error"]["code"] == -32600
    assert error_for("[]")["error"]["code"] == -32600
