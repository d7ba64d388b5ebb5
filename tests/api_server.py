"""A live loopback server for the API tests: MCP (/mcp) and the OpenAI/Anthropic API (/v1) in one uvicorn app,
on its own thread and event loop (so the official sync clients can call it from the test thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from deepseek_mcp.mcp_server.api.app import ApiApp
from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.server import build_server
from deepseek_mcp.mcp_server.service import ChatService
from deepseek_mcp.mcp_server.transports import http_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, config: ServerConfig, loader: Callable[[], Any]) -> None:
        self.port = free_port()
        self.config = config.model_copy(update={"transport": "http", "port": self.port})
        self.loader = loader
        self.service: ChatService | None = None
        self.server: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as e:  # reported by start()
            self.error = e

    async def _main(self) -> None:
        import uvicorn

        host = ModelHost(self.config, loader=self.loader)
        self.service = ChatService(host, self.config)
        api = ApiApp(self.service)
        app = api.mount(http_app(build_server(self.service), self.config))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    log_level="warning", lifespan="on"))
        async with host.running():
            await self.server.serve()

    def start(self, timeout_s: float = 60.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self.server is not None and self.server.started):
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"test server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("test server did not start")
            time.sleep(0.05)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.service is None or self.service.host.status != "ready":
            if time.monotonic() > deadline:
                raise TimeoutError("model did not load")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self._thread.join(timeout=15)

    @property
    def aengine(self) -> Any:
        assert self.service is not None
        return self.service.host.aengine


@contextmanager
def live_server(config: ServerConfig, loader: Callable[[], Any], *, ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(config, loader)
    server.start()
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()
