"""The request-body limit under a large upload (issue 22, item 1), measured on the console script: a 50 MB body
sent to /v1/chat/completions is refused with a 413 in the route's error shape once `limits.max_request_bytes`
(16 MiB by default) has arrived, never held whole: the server's resident memory grows by less than RSS_BOUND
while it arrives, and `GET /health` answers within HEALTH_BOUND_S throughout. Before the limit, a 50 MB body was
tokenized whole: RSS 0.7 -> 7.8-10.7 GB, /health stalled 21 s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest
from api_server import free_port

from deepseek_mcp.mcp_server.config import ServerConfig

SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists() or sys.platform != "linux":
    pytest.skip("needs the console script (pip install -e .) and /proc (Linux)", allow_module_level=True)

TOKEN = "body-test-token-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = ServerConfig().limits.max_request_bytes  # 16 MiB
UPLOAD = 50_000_000  # bytes each client sends
RATE = 25_000_000  # bytes/s of the slow upload (2 s for the whole body)
RSS_BOUND = 48 << 20  # the server's RSS grows less than this (a body held whole would take 50 MB at least)
HEALTH_BOUND_S = 1.0  # every /health during the uploads answers within this


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


@dataclass
class Watch:
    """RSS samples of the server every 20 ms and /health latencies every 50 ms, while it runs."""

    pid: int
    url: str
    rss: list[int] = field(default_factory=list)
    health: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        threading.Thread(target=self._sample, daemon=True).start()
        threading.Thread(target=self._probe, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        time.sleep(0.1)

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.rss.append(rss(self.pid))

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.wait(0.05):
                start = time.monotonic()
                status = http.get("/health").status_code
                self.health.append((time.monotonic() - start, status))


@dataclass
class Upload:
    status_line: bytes
    body: dict[str, object]
    sent_at_answer: int  # body bytes the client had sent when the answer arrived
    answer_s: float  # from the request head to the answer


def upload(port: int, path: str, headers: dict[str, str], *, chunked: bool, rate: float | None,
           to_the_end: bool = False) -> Upload:
    """POST UPLOAD bytes of a JSON body (chunked, or with its Content-Length), at `rate` bytes/s (None: as fast as
    the connection takes them), reading the answer meanwhile; sending stops at the answer (`to_the_end`: goes on
    after it) or when the server closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {UPLOAD}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    answer = bytearray()
    answered = threading.Event()
    sent = 0
    sent_at_answer, answered_at = -1, 0.0

    def read() -> None:
        nonlocal sent_at_answer, answered_at
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            if sent_at_answer < 0:
                sent_at_answer, answered_at = sent, time.monotonic()
            answer.extend(data)
            if b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) >= _content_length(answer):
                answered.set()
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    start = time.monotonic()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{head}"
                 f"{framing}\r\n\r\n".encode())
    reader.start()
    prefix = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "'
    piece = b"x" * (1 << 16)
    try:
        while sent < UPLOAD and (to_the_end or not answered.is_set()):
            data = prefix if sent == 0 else piece[: UPLOAD - sent]
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
            if rate is not None:
                time.sleep(max(start + sent / rate - time.monotonic(), 0.0))
    except OSError:  # the server closed the connection after answering
        pass
    assert answered.wait(10), f"no answer after {sent} bytes"
    sock.shutdown(socket.SHUT_RDWR)  # the server keeps the connection (it reads and drops the rest of a body)
    sock.close()
    reader.join(5)
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    return Upload(status_line, json.loads(rest.split(b"\r\n\r\n", 1)[1]), sent_at_answer, answered_at - start)


def _content_length(response: bytearray) -> int:
    for line in bytes(response).split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@contextmanager
def console_server(log: Path, token: str) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`deepseek-mcp --transport http` on a free loopback port, its output in `log`, once `/health` says ok:
    (process, port, log); killed on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SCRIPT), "--transport", "http", "--port", str(port), "--token", token,
                                 "--max-tokens", "4", "--temperature", "0"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield proc, port, log
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    with console_server(tmp_path_factory.mktemp("body") / "server.log", TOKEN) as served:
        yield served


def test_a_50_mb_upload_is_refused_as_it_arrives_with_memory_and_health_bounded(
        server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    proc, port, log = server
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", headers=AUTH, json=chat, timeout=60).status_code == 200
    baseline = min(rss(proc.pid) for _ in range(5))
    with Watch(proc.pid, url) as watch:
        # no Content-Length, sent to its end at RATE: the server answers at the limit and drops the rest
        slow = upload(port, "/v1/chat/completions", AUTH, chunked=True, rate=RATE, to_the_end=True)
        whole = upload(port, "/v1/chat/completions", AUTH, chunked=False, rate=None)
        anthropic = upload(port, "/v1/messages", {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
                           chunked=False, rate=None)
    grown = max(watch.rss) - baseline
    slowest = max(s for s, _ in watch.health)
    print(f"RSS {baseline / 2**20:.0f} MB, grew at most {grown / 2**20:.1f} MB over {len(watch.rss)} samples; "
          f"/health slowest {slowest * 1000:.0f} ms of {len(watch.health)}; the slow upload answered after "
          f"{slow.sent_at_answer / 1e6:.1f} MB, {slow.answer_s:.2f} s; declared: {whole.answer_s * 1000:.0f} ms")
    for up in (slow, whole):  # OpenAI's shape
        assert up.status_line.startswith(b"HTTP/1.1 413 "), up
        error = up.body["error"]
        assert isinstance(error, dict) and error["code"] == "request_too_large", up.body
        assert error["type"] == "invalid_request_error" and "limits.max_request_bytes" in error["message"]
    assert anthropic.status_line.startswith(b"HTTP/1.1 413 ") and anthropic.body["type"] == "error"
    assert anthropic.body["error"] == {"type": "request_too_large", "message": whole.body["error"]["message"]}
    # refused once the limit had arrived, not at the end of the body; a declared length at once
    assert LIMIT < slow.sent_at_answer < UPLOAD - 8 * (1 << 20), slow.sent_at_answer
    assert whole.answer_s < 1.0 and anthropic.answer_s < 1.0, (whole, anthropic)
    assert grown < RSS_BOUND, f"RSS grew {grown / 2**20:.1f} MB"
    assert len(watch.health) >= 10 and {s for _, s in watch.health} == {200}, watch.health
    assert slowest < HEALTH_BOUND_S, watch.health
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    text = log.read_text()
    assert text.count("413 the request body is larger than this server takes") == 3, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
