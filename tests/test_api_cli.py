"""The console script as users run it: the seed's example against `deepseek-mcp --transport http`, and
`--api-port` serving the API beside a stdio MCP server (one process, one model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from api_server import free_port
from openai import OpenAI

SCRIPT = Path(sys.executable).parent / "deepseek-mcp"
if not SCRIPT.exists():
    pytest.skip("console script deepseek-mcp not installed (pip install -e .)", allow_module_level=True)


def start(tmp_path: Path, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_MCP_TOKEN", "DEEPSEEK_MCP_CONFIG")}
    log = (tmp_path / "server.log").open("wb")
    return subprocess.Popen([str(SCRIPT), "--max-tokens", "8", "--temperature", "0", *args], env=env,
                            stdin=stdin, stdout=subprocess.PIPE if stdin else log, stderr=log)


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text())


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("api-http")
    port = free_port()
    proc = start(tmp, "--transport", "http", "--port", str(port), "--token", "seed-token-0123456789")
    try:
        wait_healthy(port, proc, tmp / "server.log")
        yield port
    finally:
        stop(proc, tmp / "server.log")


def test_seed_example_against_the_console_script(http_server: int) -> None:
    from openai import OpenAI
    client = OpenAI(api_key="seed-token-0123456789", base_url=f"http://127.0.0.1:{http_server}/v1")
    response = client.chat.completions.create(
        model="deepseek-chat",
        messages=[
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "Hello"},
        ],
        stream=False,
        extra_body={"thinking": {"type": "enabled"}}
    )
    print(response.choices[0].message.content)
    assert response.choices[0].message.content
    wrong = OpenAI(api_key="nope", base_url=f"http://127.0.0.1:{http_server}/v1", max_retries=0)
    with pytest.raises(Exception, match="401"):
        wrong.models.list()


def test_api_port_beside_stdio(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, "--api-port", str(port), "--served-model-name", "local-a", "local-b",
                 stdin=subprocess.PIPE)
    try:
        wait_healthy(port, proc, tmp_path / "server.log")
        client = OpenAI(api_key="any", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["local-a", "local-b"]
        r = client.chat.completions.create(model="local-b", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content and r.usage.completion_tokens == 8 and r.model == "local-b"
        with pytest.raises(openai.NotFoundError, match="local-a, local-b"):
            client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])
        assert proc.stdin is not None and proc.stdout is not None
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
        proc.stdin.write((json.dumps(init) + "\n").encode())
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "deepseek-mcp"
        proc.stdin.close()  # stdio ends: the whole process (and the API) stops
        proc.wait(20)
        assert proc.returncode == 0, (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
