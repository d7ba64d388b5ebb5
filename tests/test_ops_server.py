"""The console script under operations (issue 22, items 6-8): idle and slow connections are closed, a client
that disconnects is one INFO line, `--log-format json` lines parse, and SIGTERM during streams ends every stream
with its API's error event and exits within 2 s, without a traceback. One server process for the module; the
SIGTERM test stops it, so it runs last."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from api_server import free_port

SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists():
    pytest.skip("console script deepseek-mcp not installed (pip install -e .)", allow_module_level=True)

TOKEN = "ops-test-token-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """Every log line, parsed (each must be one JSON object)."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def wait_for(self, predicate: Any, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [r for r in self.records() if predicate(r)]
            if found:
                return found
            time.sleep(0.05)
        return []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("ops")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SCRIPT), "--transport", "http", "--port", str(port), "--token", TOKEN,
                                 "--max-tokens", "8", "--temperature", "0", "--log-format", "json",
                                 "--keep-alive-timeout", "1", "--header-timeout", "1", "--body-timeout", "1",
                                 "--max-header-bytes", "4096"],
                                env=env, stdout=out, stderr=out)
    s = Served(proc, port, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(s.url + "/health").json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (since the call)."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def test_idle_and_slow_connections_are_closed(served: Served) -> None:
    # a connection that sends nothing: closed after the header timeout (1 s), silently
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        data, took = _read_until_closed(sock, 10)
    assert data == b"" and 0.8 < took < 5, (data, took)
    # headers trickled in and never finished (slow loris): 408, then closed
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        sock.sendall(b"X-Slow: 1\r\n")
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in data and took < 5, data
    # a body that stops half-way: 408, then closed
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 400\r\n\r\n{\"model\": ")
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in data and took < 5, data
    # the same on the MCP endpoint (its body is read before the SDK sees it), and a body past the limit: 413
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 400\r\n\r\n{\"jsonrpc\": ")
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 408 ") and took < 5, data
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 99999999\r\n\r\n{")
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 413 ") and b"max_request_bytes" in data and took < 1, data
    # a keep-alive connection idle after its response: closed after the keep-alive timeout (1 s)
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in data and 0.8 < took < 5, (data, took)
    # a request head past --max-header-bytes: 400, closed
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 6000)
        data, took = _read_until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 400 ") and took < 1, (data, took)
    # the server goes on serving
    r = httpx.post(served.url + "/v1/chat/completions", headers=AUTH,
                   json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    lines = [r["message"] for r in served.records()]
    assert sum("request headers were incomplete" in m for m in lines) == 1, lines
    assert sum("request body was incomplete" in m for m in lines) == 2, lines


def test_a_client_disconnect_is_one_info_line(served: Served) -> None:
    for path in ("/v1/chat/completions", "/mcp"):  # gone while sending its body
        with socket.create_connection(("127.0.0.1", served.port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer {TOKEN}\r\nContent-Length: 400\r\n\r\n{{".encode())
            time.sleep(0.2)
        assert served.wait_for(lambda r, p=path: r["message"] == f"POST {p}: client disconnected before its "
                               "request was read" and r["level"] == "INFO"), served.log.read_text()[-3000:]
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 3000, "stream": True}
    with httpx.Client(base_url=served.url, headers=AUTH) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as r:
        first = json.loads(next(line for line in r.iter_lines() if line).removeprefix("data: "))
    rid = first["id"]
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        httpx.post(served.url + "/v1/messages", headers=AUTH, timeout=1.0,
                   json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 3000})
    gone = served.wait_for(lambda r: "disconnected" in r["message"] and "messages msg_" in r["message"])
    assert gone, served.log.read_text()[-3000:]
    about_stream = [r for r in served.records() if rid in r["message"]]
    assert len(about_stream) == 1 and about_stream[0]["level"] == "INFO", about_stream
    assert "client disconnected mid-stream" in about_stream[0]["message"]
    mid = gone[0]["message"].split()[1].rstrip(":")
    about_message = [r for r in served.records() if mid in r["message"]]
    assert len(about_message) == 1 and about_message[0]["level"] == "INFO", about_message
    assert not [r for r in served.records() if r["level"] in ("ERROR", "CRITICAL") or "exc_info" in r]


def test_json_log_lines_parse_and_carry_the_request_fields(served: Served) -> None:
    r = httpx.post(served.url + "/v1/completions", headers=AUTH,
                   json={"model": "deepseek-chat", "prompt": "Once upon a time", "max_tokens": 3})
    assert r.status_code == 200
    rid = r.json()["id"]
    records = served.wait_for(lambda rec: rec.get("request_id") == rid)  # every line parsed on the way
    assert len(records) == 1, records
    rec = records[0]
    assert rec["route"] == "completions" and rec["logger"] == "deepseek_mcp.mcp_server.engine_request"
    assert rec["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and rec["completion_tokens"] == 3
    assert rec["finish_reason"] == "length" and rec["cached_tokens"] >= 0
    assert 0 <= rec["queued_s"] <= rec["elapsed_s"] and 0 < rec["ttft_s"] <= rec["elapsed_s"]
    assert rec["decode_tok_s"] > 0 and rec["message"].startswith(f"completions {rid}: ")
    assert {"time", "level", "logger", "message"} <= set(rec)


def test_sigterm_during_streams_ends_each_with_an_error_event(served: Served) -> None:
    """4 long streams (chat, completions, two messages), one long plain request, and a short stream (3 tokens,
    one out) under way: SIGTERM; the short one finishes within the default 1 s grace, then each long stream ends
    with its API's error event (OpenAI: an error chunk, then [DONE]), the plain request gets a 503, the process
    exits within 2 s with 143, one line per aborted request, no traceback. An MCP tool call under way gets an
    error result that says the server is shutting down."""
    routes = [("/v1/chat/completions", True), ("/v1/completions", True), ("/v1/messages", True),
              ("/v1/messages", True), ("/v1/chat/completions", False), ("/v1/chat/completions", True)]
    short = len(routes) - 1
    results: list[Any] = [None] * len(routes)
    started = [threading.Event() for _ in routes]

    def run(i: int, route: str, stream: bool) -> None:
        body: dict[str, Any] = {"model": "deepseek-chat", "max_tokens": 3 if i == short else 3000, "stream": stream}
        body.update({"prompt": "hi"} if route == "/v1/completions" else {"messages": HELLO})
        with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as http:
            if not stream:
                started[i].set()
                r = http.post(route, json=body)
                results[i] = (r.status_code, r.json())
                return
            with http.stream("POST", route, json=body) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if re.search(r'"(content|text)": "[^"]', line):  # a token came: it is generating
                            started[i].set()
                results[i] = (r.status_code, lines)

    mcp_result: list[Any] = []
    headers = {**AUTH, "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    r = httpx.post(served.url + "/mcp", json=init, headers=headers)
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    httpx.post(served.url + "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)

    def mcp_call() -> None:  # an MCP tool call under way too: it ends with an error result that says why
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "chat", "arguments": {"prompt": "hi", "max_tokens": 3000}}}
        mcp_result.append(httpx.post(served.url + "/mcp", json=call, headers=headers, timeout=30))

    threads = [threading.Thread(target=run, args=(i, *rs), daemon=True) for i, rs in enumerate(routes)]
    threads.append(threading.Thread(target=mcp_call, daemon=True))
    threads[-1].start()
    for t in threads[:short]:
        t.start()
    assert all(e.wait(30) for e in started[:short])
    time.sleep(0.3)
    threads[short].start()
    assert started[short].wait(30)
    sent = time.monotonic()
    served.proc.terminate()
    code = served.proc.wait(10)
    took = time.monotonic() - sent
    for t in threads:
        t.join(10)
    log = served.log.read_text()
    print(f"SIGTERM to exit: {took:.2f} s")
    assert took < 2.0 and code == 143, (took, code, log[-3000:])
    assert "Traceback" not in log and "exc_info" not in log, log[-5000:]
    records = served.records()
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], [r["message"] for r in records][-20:]
    status, got = results[short]
    assert status == 200 and got[-1] == "data: [DONE]", got[-3:]
    assert json.loads(got[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length", got[-3:]
    for (route, stream), result in zip(routes[:short], results[:short]):
        assert result is not None, (route, stream)
        status, got = result
        if not stream:
            assert status == 503 and got["error"]["code"] == "shutting_down", got
        elif route == "/v1/messages":
            assert got[-2] == "event: error", got[-3:]
            assert json.loads(got[-1].removeprefix("data: "))["error"]["type"] == "overloaded_error"
        else:
            assert got[-1] == "data: [DONE]", got[-3:]
            assert json.loads(got[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert mcp_result and mcp_result[0].status_code == 200, mcp_result
    reply = json.loads(next(line for line in mcp_result[0].text.splitlines() if line.startswith("data: "))[6:])
    assert reply["result"]["isError"] and "shutting down" in reply["result"]["content"][0]["text"], reply
    aborted = [r["message"] for r in records if r["message"].startswith("stopping: aborted")]
    assert len(aborted) == short + 1 and "stopping: aborted chat (MCP tool call)" in aborted, aborted
