"""Issue 11 hardening, items 4-10: conversations, Ctrl-C, remote Host headers, progress and the wall-time limit,
the tool list, readable errors, CLI and logs. Tests that need no model build the server around a host that never
loads; the rest share one demo Engine."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from pydantic import ValidationError

from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.errors import readable_errors
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.schemas import ChatInput, ToolCallInput
from deepseek_mcp.mcp_server.server import build_server
from deepseek_mcp.mcp_server.service import ChatService

SCRIPT = Path(sys.executable).parent / "deepseek-mcp"


def _never_loads() -> Any:
    raise RuntimeError("no model in this test")


def _offline_service(**config: Any) -> ChatService:
    cfg = ServerConfig(**config)
    return ChatService(ModelHost(cfg, loader=_never_loads), cfg)


async def _listed(service: ChatService) -> tuple[int, dict[str, Any]]:
    async with Client(build_server(service)) as client:
        result = await client.list_tools()
    return len(result.model_dump_json(by_alias=True, exclude_none=True)), {t.name: t for t in result.tools}


def _keys(node: Any) -> list[str]:
    """Every schema keyword in `node` (property names excluded)."""
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    if not isinstance(node, dict):
        return []
    out: list[str] = []
    for key, value in node.items():
        out.append(key)
        out.extend(k for sub in value.values() for k in _keys(sub)) if key == "properties" else out.extend(
            _keys(value))
    return out


# ------------------------------------------------------------------------------------ item 8: the tool list


def test_tool_list_is_lean_and_annotated_truthfully() -> None:
    size, tools = anyio.run(_listed, _offline_service())
    assert size < 8 * 1024, size  # was 32 KB
    for tool in tools.values():
        for schema in (tool.input_schema, tool.output_schema):
            keys = _keys(schema)
            assert "title" not in keys and "$ref" not in keys
        assert {"type": "null"} not in json.loads(json.dumps(tool.input_schema)).get("anyOf", [])
        assert '{"type": "null"}' not in json.dumps(tool.input_schema)
        assert tool.input_schema["additionalProperties"] is False
    reset = tools["reset_conversation"].annotations
    assert reset.destructive_hint is True and reset.read_only_hint is False
    assert tools["list_models"].annotations.read_only_hint is True
    for name in ("chat", "think", "tool_call"):  # they store the conversation
        ann = tools[name].annotations
        assert ann.read_only_hint is False and ann.destructive_hint is False and ann.open_world_hint is False
    assert "always parse" in tools["tool_call"].description
    assert "response_format" in tools["chat"].input_schema["properties"]


def test_descriptions_promise_nothing_that_is_off() -> None:
    _, tools = anyio.run(_listed, _offline_service(constrained_decoding=False))
    assert "always parse" not in tools["tool_call"].description
    assert "not constrain" in tools["tool_call"].description
    for name in ("chat", "think"):
        assert "response_format" not in tools[name].description
        assert "response_format" not in tools[name].input_schema["properties"]


def test_validation_stays_strict() -> None:
    for bad in ({"prompt": "a", "max_tokens": 0}, {"prompt": "a", "bogus": 1},
                {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
                {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
                {"prompt": "a", "response_format": {"type": "json_schema"}}):
        with pytest.raises(ValidationError):
            ChatInput.model_validate(bad)


# ------------------------------------------------------------------------------------ item 9: readable errors


def _readable(model: Any, data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return readable_errors(info.value, data, model, "arguments for chat")


def test_validation_errors_are_one_line_per_problem() -> None:
    text = _readable(ChatInput, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]})
    lines = text.splitlines()
    assert lines[0] == "invalid arguments for chat (1 problem):"
    assert len(lines) == 2 and lines[1].startswith("- messages[0].content[0].type: Input should be 'text'")
    assert "'image_url'" in lines[1]
    text = _readable(ChatInput, {"prompt": "a", "max_token": 3, "temperature": 9})
    assert "pydantic" not in text and "validation error for" not in text and "chatArguments" not in text
    assert "- max_token: Extra inputs are not permitted" in text and "did you mean 'max_tokens'" in text
    assert "- temperature: Input should be less than or equal to 2; got 9" in text
    text = _readable(ToolCallInput, {"prompt": "a", "tools": [{"type": "function", "function": {"nam": "f"}}]})
    assert "tools[0].function" in text and "tools[0].name" not in text  # the OpenAI shape it was meant as
    text = _readable(ChatInput, {"messages": [{"role": "assistant"}]})
    assert "with role 'assistant'" in text and "a 'assistant'" not in text


async def _call(service: ChatService, name: str, args: dict[str, Any]) -> Any:
    async with Client(build_server(service)) as client:
        return await client.call_tool(name, args)


def test_bad_arguments_reach_the_client_readably() -> None:
    result = anyio.run(_call, _offline_service(), "chat",
                       {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert result.is_error
    text = result.content[0].text
    assert text.startswith("invalid arguments for chat (1 problem):") and "errors.pydantic.dev" not in text
    assert "Error executing tool" not in text


def test_generation_failure_is_logged_with_its_request_id(caplog: pytest.LogCaptureFixture) -> None:
    from deepseek_mcp.mcp_server.failures import GenerationFailed

    class Broken:
        def stream(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internals /home/me/model")

        def abort(self, request_id: str) -> None:
            pass

    service = _offline_service()

    async def run() -> str:
        from deepseek_mcp.inference.engine.sampling import SamplingParams
        from deepseek_mcp.mcp_server.progress import Progress
        with pytest.raises(GenerationFailed) as info:
            await service.run(Broken(), [1, 2], SamplingParams(max_tokens=2), Progress(), thinking=False)
        return str(info.value)

    with caplog.at_level(logging.ERROR):
        message = anyio.run(run)
    assert "secret internals" not in message and "generation failed (request mcp-" in message
    request_id = message.split("request ")[1].split(")")[0]
    record = next(r for r in caplog.records if request_id in r.getMessage())
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


# ------------------------------------------------------------------------- item 4: conversations keep every turn


def test_conversation_store_is_bounded_by_tokens() -> None:
    from deepseek_mcp.mcp_server.conversations import Conversation, ConversationStore, UnknownConversation

    store = ConversationStore(capacity=10, max_tokens=100)
    store.put(Conversation("a", num_tokens=40))
    store.put(Conversation("b", num_tokens=40))
    store.get("a")  # b is now least recent
    store.put(Conversation("c", num_tokens=30))
    with pytest.raises(UnknownConversation):
        store.get("b")
    assert store.total_tokens == 70 and len(store) == 2
    store.put(Conversation("a", num_tokens=90))  # a grew: c goes, a (newest) stays
    assert store.total_tokens == 90 and len(store) == 1
    store.put(Conversation("d", num_tokens=500))  # alone over the bound: kept, the rest go
    assert len(store) == 1 and store.get("d").num_tokens == 500
    assert store.remove("d") == 0 and store.total_tokens == 0


@pytest.fixture(scope="module")
def engine() -> Any:
    from deepseek_mcp.inference.engine.engine import Engine

    return Engine.from_pretrained(None)


def _demo_config(**limits: Any) -> ServerConfig:
    from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults

    return ServerConfig(cache_tokens=4096, sampling=SamplingDefaults(temperature=0.0),
                        limits=Limits(**{"max_tokens": 2, "progress_interval_s": 0.2, **limits}))


def test_concurrent_turns_on_one_conversation_are_all_kept(engine: Any) -> None:
    async def run() -> tuple[int, int]:
        config = _demo_config()
        host = ModelHost(config, loader=lambda: engine)
        service = ChatService(host, config)
        async with host.running(), Client(build_server(service)) as client:
            first = await client.call_tool("chat", {"prompt": "one", "max_tokens": 2})
            cid = first.structured_content["conversation_id"]
            results: list[Any] = []

            async def turn(text: str) -> None:
                results.append(await client.call_tool("chat", {"prompt": text, "conversation_id": cid,
                                                                "max_tokens": 2}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(turn, "two")
                tg.start_soon(turn, "three")
            assert not any(r.is_error for r in results), results
            await client.call_tool("chat", {"prompt": "four", "conversation_id": cid, "max_tokens": 2})
            conv = service.conversations.get(cid)
            users = [m["content"] for m in conv.messages if m["role"] == "user"]
            assert users[0] == "one" and users[-1] == "four" and sorted(users[1:3]) == ["three", "two"]
            return len(conv.messages), conv.num_tokens

    num_messages, num_tokens = anyio.run(run)
    assert num_messages == 8  # main kept 6: the later of the two concurrent turns overwrote the other
    assert num_tokens > 0


# --------------------------------------------------------------- item 7: queueing, prefill chunks, the time limit


class _FakeScheduler:
    def __init__(self, chunk_tokens: int) -> None:
        self.max_num_batched_tokens = chunk_tokens
        self.waiting: list[Any] = []
        self.seqs: dict[str, Any] = {}

    def get(self, request_id: str) -> Any:
        return self.seqs.get(request_id)


class SlowEngine:
    """Stands in for AsyncEngine: a request waits `queue_s` for admission, prefills its prompt in chunks of
    `chunk_tokens` taking `chunk_s` each, then decodes `words` one per `token_s`."""

    def __init__(self, *, queue_s: float, chunk_s: float, words: list[str], token_s: float,
                 chunk_tokens: int = 64) -> None:
        self.scheduler = _FakeScheduler(chunk_tokens)
        self.queue_s, self.chunk_s, self.words, self.token_s = queue_s, chunk_s, words, token_s
        self.max_model_len = 1 << 20
        self.aborted: set[str] = set()

    async def __aenter__(self) -> SlowEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def stream(self, prompt_ids: list[int], params: Any, *, request_id: str, **_: Any) -> Any:
        from types import SimpleNamespace

        from deepseek_mcp.inference.engine.sequence import SequenceStatus

        def out(ids: list[int], delta: str, reason: str | None) -> Any:
            return SimpleNamespace(new_token_ids=ids[-1:] if delta else [], token_ids=list(ids), text_delta=delta,
                                   num_cached_tokens=0, finished=reason is not None, finish_reason=reason,
                                   stop=None, stats=None)

        seq = SimpleNamespace(status=SequenceStatus.WAITING, num_computed_tokens=0,
                              num_prompt_tokens=len(prompt_ids))
        self.scheduler.seqs[request_id] = seq
        self.scheduler.waiting.append(seq)
        await anyio.sleep(self.queue_s)
        self.scheduler.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        while seq.num_computed_tokens < len(prompt_ids):
            await anyio.sleep(self.chunk_s)
            if request_id in self.aborted:
                yield out([], "", "abort")
                return
            seq.num_computed_tokens = min(seq.num_computed_tokens + self.scheduler.max_num_batched_tokens,
                                          len(prompt_ids))
        ids: list[int] = []
        for i, word in enumerate(self.words):
            await anyio.sleep(self.token_s)
            if request_id in self.aborted:
                yield out(ids, "", "abort")
                return
            ids.append(i + 1)
            yield out(ids, word, "stop" if i == len(self.words) - 1 else None)


def test_progress_says_queued_prefill_chunks_and_text_and_the_limit_starts_at_admission() -> None:
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.mcp_server.engine_request import run_request
    from deepseek_mcp.mcp_server.progress import Progress

    messages: list[str] = []

    async def send(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    words = ["alpha ", "beta ", "gamma"]
    fake = SlowEngine(queue_s=1.0, chunk_s=0.3, words=words, token_s=0.15)
    run = anyio.run(lambda: run_request(fake, list(range(192)), SamplingParams(max_tokens=8),
                                        progress=Progress(send), time_limit_s=1.8, interval_s=0.1))
    # 1.0 s queued + 0.9 s prefill > 1.8 s: a limit counted from submission would cut it before any token
    assert run.finish_reason == "stop" and run.text == "alpha beta gamma", (run, messages)
    assert run.queued_s >= 0.9
    assert any(m.startswith("queued: waiting for a free slot") for m in messages), messages
    assert not any("prefill" in m for m in messages[:5]), messages  # queued requests do not claim to prefill
    assert any("prefilling the prompt: chunk 1/3 done (64/192 tokens" in m for m in messages), messages
    assert any("chunk 2/3 done" in m for m in messages), messages
    assert any(m.startswith("generated ") and m.endswith("alpha beta") for m in messages), messages


def test_a_result_cut_before_its_first_token_is_an_error(engine: Any) -> None:
    fake = SlowEngine(queue_s=0.0, chunk_s=0.3, words=["x"], token_s=0.1, chunk_tokens=4)

    async def run() -> Any:
        config = _demo_config(max_wall_time_s=0.5, progress_interval_s=0.1)
        host = ModelHost(config, loader=lambda: engine, make_async_engine=lambda _: fake)
        service = ChatService(host, config)
        async with host.running(), Client(build_server(service)) as client:
            return await client.call_tool("chat", {"prompt": "a long prompt " * 20, "max_tokens": 2})

    result = anyio.run(run)
    assert result.is_error, result
    text = result.content[0].text
    assert "0.5 s wall-time limit" in text and "--max-wall-time" in text and "before the first output token" in text
    assert "counted from admission" in text


def test_the_limit_before_the_first_token_is_a_server_timeout_not_a_client_error(engine: Any) -> None:
    """The wall-time limit ending a request before its first token is the server's (GenerationTimeout): the HTTP
    APIs answer 504 in their own shapes (Anthropic's timeout_error), never a 400."""
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.mcp_server.api.errors import from_exception
    from deepseek_mcp.mcp_server.failures import GenerationTimeout, RequestError
    from deepseek_mcp.mcp_server.progress import Progress

    fake = SlowEngine(queue_s=0.0, chunk_s=0.3, words=["x"], token_s=0.1, chunk_tokens=4)
    config = _demo_config(max_wall_time_s=0.5, progress_interval_s=0.1)
    service = ChatService(ModelHost(config, loader=lambda: engine), config)

    async def run() -> None:
        await service.run(fake, list(range(3, 83)), SamplingParams(max_tokens=2), Progress(), thinking=False)

    with pytest.raises(GenerationTimeout) as info:
        anyio.run(run)
    assert not isinstance(info.value, RequestError) and "before the first output token" in str(info.value)
    err = from_exception(info.value)
    assert err.status == 504 and err.body("openai")["error"]["code"] == "timeout"
    assert err.body("anthropic")["error"]["type"] == "timeout_error"


# ---------------------------------------------------------------------------- item 5: SIGINT/SIGTERM stop it


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.mark.skipif(not SCRIPT.exists() or sys.platform != "linux", reason="needs the console script, Linux")
@pytest.mark.parametrize(("transport", "signum"), [("stdio", signal.SIGINT), ("tty", signal.SIGINT),
                                                   ("http", signal.SIGTERM)])
def test_signals_stop_the_server_within_two_seconds(transport: str, signum: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    args = [str(SCRIPT)] + (["--transport", "http", "--port", "0"] if transport == "http" else [])
    master = slave = None
    if transport == "tty":
        import pty

        master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave if slave is not None else subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            lines.append(line)
            if not line or "transports: serving MCP over" in line:
                break
        assert "transports: serving MCP over" in lines[-1], "".join(lines)
        children = _children(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        for fd in (master, slave):
            if fd is not None:
                os.close(fd)
    err = "".join(lines) + proc.stderr.read()  # type: ignore[union-attr]
    assert took < 2.0, (took, err)
    assert code == 128 + signum, err
    assert "received: stopping the server" in err and "Traceback" not in err
    assert not any(os.path.exists(f"/proc/{c}") for c in children)
    on_terminal = "waits for an MCP client on stdin" in err and "README.md" in err
    assert on_terminal == (transport == "tty"), err


# ------------------------------------------------------------------------------ item 6: remote HTTP by address


def test_non_loopback_bind_admits_this_machines_addresses_on_the_bound_port() -> None:
    from deepseek_mcp.mcp_server.hosts import interface_addresses
    from deepseek_mcp.mcp_server.transports import security_settings

    config = ServerConfig(transport="http", host="0.0.0.0", port=8123, token="t" * 20,
                          allowed_hosts=["mcp.example:443"])
    allowed = security_settings(config).allowed_hosts
    addresses = [a for a in interface_addresses(ipv6=False) if not a.startswith("127.")]
    resolved = {str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None) if ":" not in str(i[4][0])}
    for address in addresses + sorted(resolved - {"127.0.0.1"}):
        assert f"{address}:8123" in allowed, (address, allowed)
        assert f"{address}:*" not in allowed  # the bound port only
    assert f"{socket.gethostname()}:8123" in allowed and "mcp.example:443" in allowed
    assert "127.0.0.1:*" in allowed and "localhost:*" in allowed
    loopback = security_settings(ServerConfig(transport="http")).allowed_hosts
    assert not any(a.startswith(tuple(addresses)) for a in loopback if addresses)


def test_421_names_the_host_and_the_flag() -> None:
    from deepseek_mcp.mcp_server.hosts import host_admitted, refusal

    body = refusal("10.1.2.3:8000").body.decode()
    assert "'10.1.2.3:8000'" in body and "--allowed-host 10.1.2.3:8000" in body
    assert host_admitted("a:5", ["a:*"]) and not host_admitted("ab:5", ["a:*"]) and not host_admitted(None, ["a"])


def test_a_request_by_interface_address_is_admitted() -> None:
    """A loopback connection carrying a Host header of this machine's interface address, to an app configured
    for a 0.0.0.0 bind (the socket itself listens on 127.0.0.1 only)."""
    import httpx2
    import uvicorn

    from deepseek_mcp.mcp_server.hosts import interface_addresses
    from deepseek_mcp.mcp_server.transports import http_app

    address = next((a for a in interface_addresses(ipv6=False) if not a.startswith("127.")), None)
    if address is None:
        pytest.skip("no non-loopback IPv4 interface")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    token = "a-token-of-twenty-chars"
    service = _offline_service(transport="http", host="0.0.0.0", port=port, token=token)
    app = http_app(build_server(service), service.config)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "Authorization": f"Bearer {token}"}

    async def run() -> tuple[Any, Any]:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                               lifespan="on"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            while not server.started:
                await anyio.sleep(0.05)
            url = f"http://127.0.0.1:{port}/mcp"
            async with httpx2.AsyncClient(timeout=10) as http:
                ok = await http.post(url, json=init, headers={**headers, "Host": f"{address}:{port}"})
                refused = await http.post(url, json=init, headers={**headers, "Host": f"{address}:{port + 1}"})
            server.should_exit = True
        return ok, refused

    ok, refused = anyio.run(run)
    assert ok.status_code == 200, ok.text  # main: 421 Invalid Host header
    assert refused.status_code == 421 and f"--allowed-host {address}:{port + 1}" in refused.text


# ---------------------------------------------------------------------------------------- item 10: CLI and logs


def test_server_cli_version_print_config_and_token_warnings(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_mcp.mcp_server.__main__ import main

    monkeypatch.delenv("DEEPSEEK_MCP_TOKEN", raising=False)
    monkeypatch.delenv("DEEPSEEK_MCP_CONFIG", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("deepseek-mcp ")
    assert main(["--token", "hunter2", "--print-config"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token"] == "(set, not shown)" and "hunter2" not in out.out + out.err
    assert "token is set but the transport is stdio" in out.err and "only 7 characters" in out.err
    assert main(["--transport", "http", "--token", "a-long-enough-token-value", "--print-config"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and json.loads(out.out)["token"] == "(set, not shown)"
    printed = capsys.readouterr().out if main(["--print-config"]) == 0 else ""
    assert json.loads(printed)["token"] is None


def test_generate_cli_has_one_kernel_flag_and_help_for_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from deepseek_mcp.inference.__main__ import build_parser

    parser = build_parser()
    generate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    for action in generate._actions:
        assert action.help, action.option_strings
    args = parser.parse_args(["generate", "--prompt", "x", "--kernels", "torch"])
    assert args.kernels == "torch"
    args = parser.parse_args(["generate", "--prompt", "x", "--backend", "torch"])
    assert args.kernels == "torch" and "--backend is deprecated; use --kernels" in capsys.readouterr().err
    assert parser.parse_args(["generate", "--prompt", "x"]).kernels == "auto"


def test_generate_streams_and_heads_reasoning_and_answer(engine: Any, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_mcp.inference.__main__ import _Printer, _stream
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.inference.text.parse import ContentDelta, ReasoningDelta
    from deepseek_mcp.inference.text.template import render_ids

    printer = _Printer(thinking=True)
    printer.events([ReasoningDelta("why"), ReasoningDelta(" so"), ContentDelta("because")])
    assert capsys.readouterr().out == "--- reasoning ---\nwhy so\n--- answer ---\nbecause"
    writes: list[str] = []
    monkeypatch.setattr(_Printer, "write", lambda self, part, text: writes.append(text) if text else None)
    ids = render_ids([{"role": "user", "content": "hi"}], engine.tokenizer, thinking=True)
    out, _ = anyio.run(_stream, engine, ids, SamplingParams(max_tokens=5), _Printer(thinking=True), False)
    assert out.finished and len(out.token_ids) >= 1
    assert len(writes) >= 2 or len(out.token_ids) == 1  # one write per decoded piece, not one at the end


def test_demo_write_is_logged_with_path_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from deepseek_mcp.inference.model.demo import DEMO_VERSION
    from deepseek_mcp.mcp_server.model_host import logging_demo_write

    monkeypatch.setenv("DEEPSEEK_MCP_CACHE", str(tmp_path))
    target = tmp_path / f"demo-{DEMO_VERSION}"

    def write() -> str:
        target.mkdir()
        (target / "model.safetensors.index.json").write_text("{}")
        (target / "model-1.safetensors").write_bytes(b"\0" * 3_000_000)
        return "engine"

    with caplog.at_level(logging.INFO):
        assert logging_demo_write(write) == "engine"
        assert logging_demo_write(lambda: "again") == "again"  # already there: nothing to say
    text = [r.getMessage() for r in caplog.records]
    assert any(f"writing the demo checkpoint (random weights) to {target}" in t for t in text), text
    assert sum(f"wrote the demo checkpoint to {target}: 0.00 GB" in t for t in text) == 1, text


def test_one_log_line_per_request_and_one_context_number(engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> dict[str, Any]:
        config = _demo_config()
        host = ModelHost(config, loader=lambda: engine)
        service = ChatService(host, config)
        async with host.running(), Client(build_server(service)) as client:
            await client.call_tool("chat", {"prompt": "hello", "max_tokens": 2})
            return (await client.call_tool("list_models", {})).structured_content["models"][0]

    logger = "deepseek_mcp.mcp_server.engine_request"
    with caplog.at_level(logging.INFO, logger=logger):
        info = anyio.run(run)
    lines = [r.getMessage() for r in caplog.records if r.name == logger and " tok/s" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("chat mcp-") and "prompt tokens (0 cached), 2 completion tokens" in lines[0]
    assert "finish length" in lines[0]
    # the engine's own timings: a first-token time, and a decode rate over the tokens after the first (it once
    # divided by a queue time sampled every 0.5 s and printed 1000000000.0 tok/s for one token)
    assert re.search(r"queued [0-9.]+ s, ", lines[0]) and lines[0].count(" s in all") == 1, lines[0]
    timing = re.search(r"first token ([0-9.]+) s, ([0-9.]+) tok/s decoding", lines[0])
    assert timing is not None and float(timing.group(1)) < 60 and 0 < float(timing.group(2)) < 1e5, lines[0]
    assert info["context_tokens"] == 4096 and "max_position_embeddings" not in info["architecture"]
    assert "capped by the KV cache (4096 tokens" in info["context_limit"] and "163840" in info["context_limit"]


def test_printed_config_with_its_token_placeholder_is_refused(tmp_path: Path) -> None:
    from deepseek_mcp.mcp_server.config import ConfigError, load_config, printable

    path = tmp_path / "config.json"
    path.write_text(printable(ServerConfig(token="a-long-enough-token-value")))
    with pytest.raises(ConfigError, match="placeholder --print-config writes"):
        load_config(path, environ={})
    path.write_text(printable(ServerConfig()))
    assert load_config(path, environ={}) == ServerConfig()


def test_stdin_lines_from_a_pipe_and_a_regular_file(tmp_path: Path) -> None:
    import threading

    from deepseek_mcp.mcp_server.transports import StdinLines

    data = b'{"a":1}\n' + b"x" * 200_000 + b"\n\xc3\xa9tail"
    read_fd, write_fd = os.pipe()

    def write() -> None:
        os.write(write_fd, data)
        os.close(write_fd)

    async def lines(fd: int) -> list[str]:
        return [line async for line in StdinLines(fd)]

    threading.Thread(target=write).start()
    try:
        from_pipe = anyio.run(lines, read_fd)
    finally:
        os.close(read_fd)
    path = tmp_path / "stdin"
    path.write_bytes(data)
    with path.open("rb") as f:  # the event loop cannot watch a regular file: read in a worker thread
        from_file = anyio.run(lines, f.fileno())
    assert from_pipe == from_file == ['{"a":1}\n', "x" * 200_000 + "\n", "étail"]
