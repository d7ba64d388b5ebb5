"""Serving the MCP server over stdio, streamable HTTP or SSE, with the model host running alongside.

stdio: nothing but protocol on stdout (the SDK points fd 1 at stderr while serving, logs go to stderr), a line
that is not JSON-RPC gets a JSON-RPC error, and the process ends when stdin closes.
HTTP/SSE: Host/Origin validation against DNS rebinding (the SDK's transport security), and a static bearer token
checked by the SDK's bearer-auth middleware whenever one is configured (required beyond loopback).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import mcp_types as types
from mcp.server import MCPServer
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.message import SessionMessage
from pydantic import ValidationError
from starlette.requests import Request

from deepseek_mcp.mcp_server.config import ServerConfig, is_loopback
from deepseek_mcp.mcp_server.hosts import LOOPBACK_HOSTS, HostGate, allowed_hosts
from deepseek_mcp.mcp_server.mcp_body import WholeBody
from deepseek_mcp.mcp_server.shutdown import Drain

log = logging.getLogger(__name__)

class StaticTokenVerifier:
    """Accepts exactly one bearer token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="deepseek-mcp-client", scopes=[])
        return None


def auth_kwargs(config: ServerConfig) -> dict[str, Any]:
    """MCPServer keyword arguments that require `Authorization: Bearer <token>` on every HTTP/SSE request."""
    if config.transport == "stdio" or not config.token:
        return {}
    # No OAuth server: the issuer is nominal (the SDK serves no OAuth routes without a provider).
    base = f"http://{config.host}:{config.port}"
    return {"token_verifier": StaticTokenVerifier(config.token),
            "auth": AuthSettings(issuer_url=base, resource_server_url=None)}


def security_settings(config: ServerConfig) -> TransportSecuritySettings:
    """Accepted Host and Origin headers: loopback names on any port, beyond loopback this machine's names and
    addresses on the bound ports (the server's and `--api-port`; mcp_server/hosts.py), and whatever the
    configuration adds."""
    ports = dict.fromkeys(p for p in (config.port, config.api_port) if p is not None)
    hosts = list(dict.fromkeys(h for port in ports for h in allowed_hosts(
        config.host, port, config.bind_is_loopback(), config.allowed_hosts)))
    origins = [*(f"http://{n}:*" for n in LOOPBACK_HOSTS), *(f"http://{n}" for n in LOOPBACK_HOSTS),
               *config.allowed_origins]
    if not config.bind_is_loopback():
        log.info("accepting Host headers %s; add others with --allowed-host", ", ".join(hosts))
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


class _CheckSseOrigin:
    """Refuse a foreign Host/Origin on the SSE stream before the SDK's SSE endpoint sees it (that endpoint
    answers 403 too, then raises, which would log a traceback per refused request)."""

    def __init__(self, app: Any, settings: TransportSecuritySettings, sse_path: str) -> None:
        self.app, self.security, self.sse_path = app, TransportSecurityMiddleware(settings), sse_path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == self.sse_path:
            refused = await self.security.validate_request(Request(scope, receive), is_post=False)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, config: ServerConfig, wrap: Callable[[Any], Any] | None = None) -> Any:
    """The MCP endpoint (`wrap` puts more routes beside it), behind the Host gate."""
    security = security_settings(config)
    if config.transport == "sse":
        app = _CheckSseOrigin(mcp.sse_app(transport_security=security, host=config.host), security, "/sse")
    else:
        app = mcp.streamable_http_app(streamable_http_path=config.path, transport_security=security,
                                      host=config.host)
    app = WholeBody(app, config.limits.max_request_bytes)  # read within the limit before the SDK sees it
    return HostGate(app if wrap is None else wrap(app), security.allowed_hosts)


# After the drain (mcp_server/shutdown.py) has ended every request: how long uvicorn waits for connections
# before it cancels what is left (nothing, normally).
_HTTP_GRACE_S = 0.3


async def serve_http(mcp: MCPServer, config: ServerConfig, stop: anyio.Event | None = None,
                     wrap: Callable[[Any], Any] | None = None, drain: Drain | None = None) -> None:
    """Serve until `stop` is set (the process's SIGINT/SIGTERM handler sets it; uvicorn's own is off), then
    `drain` the requests under way. `wrap`: puts more routes beside the MCP endpoint (the OpenAI/Anthropic API),
    behind the same Host gate."""
    where = config.path if config.transport == "http" else "/sse"
    log.info("serving MCP over %s at http://%s:%d%s%s", config.transport, config.host, config.port, where,
             " (bearer token required)" if config.token else "")
    if not is_loopback(config.host):
        log.warning("listening beyond loopback on %s: every request needs the bearer token", config.host)
    await run_uvicorn(http_app(mcp, config, wrap), config, config.port, stop, lifespan="on", drain=drain)


def uvicorn_config(app: Any, config: ServerConfig, port: int, *, lifespan: str) -> Any:
    """uvicorn's settings: our log handler, the idle keep-alive timeout, and the header and body timeouts of
    mcp_server/http_timeouts.py (its h11 protocol, also where httptools is installed)."""
    import uvicorn

    from deepseek_mcp.mcp_server.http_timeouts import timed_protocol  # uvicorn's h11: imported when serving

    limits = config.limits
    # log_config=None: uvicorn logs through our stderr handler (its default sends access lines to stdout)
    return uvicorn.Config(app, host=config.host, port=port, log_config=None, log_level=config.log_level.lower(),
                          lifespan=lifespan, timeout_graceful_shutdown=_HTTP_GRACE_S,  # type: ignore[arg-type]
                          timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=limits.max_header_bytes,
                          http=timed_protocol(limits.header_timeout_s, limits.body_timeout_s))


async def run_uvicorn(app: Any, config: ServerConfig, port: int, stop: anyio.Event | None, *,
                      lifespan: str, drain: Drain | None = None) -> None:
    """uvicorn on `config.host:port` without its own signal handling, until `stop` is set; then `drain` ends
    the requests under way before uvicorn closes the connections."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the caller owns the signals
            yield

    server = Server(uvicorn_config(app, config, port, lifespan=lifespan))
    async with anyio.create_task_group() as tg:
        if stop is not None:
            async def exit_on_stop() -> None:
                await stop.wait()
                if drain is not None:
                    await drain.drain()
                server.should_exit = True

            tg.start_soon(exit_on_stop)
        await server.serve()
        tg.cancel_scope.cancel()


def _jsonrpc_error(exc: Exception) -> SessionMessage:
    """The JSON-RPC error for a line that failed to parse: Parse error, or Invalid Request (echoing its id)."""
    request_id = None
    code, message = types.INVALID_REQUEST, "Invalid Request: not a JSON-RPC 2.0 message"
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            code, message = types.PARSE_ERROR, "Parse error: the line is not valid JSON"
        for e in errors:
            candidate = e.get("input")
            if isinstance(candidate, dict) and isinstance(candidate.get("id"), (str, int)):
                request_id = candidate["id"]
                break
    error = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))
    return SessionMessage(error)


class StdinLines:
    """Lines of stdin for the SDK's stdio transport, read so that stopping the server never waits on a blocked
    read (the SDK's reader thread would hold the process until stdin closed): `end()` ends the lines at once, as
    if stdin had closed. On POSIX the event loop waits for the descriptor to be readable, then takes what is
    there; where it cannot watch the descriptor (a regular file; Windows) the read runs in a worker thread the
    server may abandon. Reads are `os.read` on a private duplicate of fd 0, so an abandoned thread holds no Python
    buffer lock at exit."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._eof = False
        self._ended = False
        self._reading: anyio.CancelScope | None = None
        self._poll = os.name == "posix"

    def end(self) -> None:
        """No more lines (the server is stopping): a read under way returns, lines not yet taken are dropped."""
        self._ended = True
        if self._reading is not None:
            self._reading.cancel()

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        while (end := self._buffer.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buffer)
            if self._ended:
                raise StopAsyncIteration
            if self._eof:
                if not self._buffer:
                    raise StopAsyncIteration
                end = len(self._buffer) - 1  # a last line without its newline
                break
            with anyio.CancelScope() as self._reading:
                chunk = await self._read()
            self._reading = None
            if self._ended:
                raise StopAsyncIteration
            self._eof = not chunk
            self._buffer += chunk
        if self._ended:
            raise StopAsyncIteration
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line.decode("utf-8", errors="replace")

    async def _read(self) -> bytes:
        if self._poll:
            try:
                await anyio.wait_readable(self._fd)
            except (OSError, ValueError, NotImplementedError):  # epoll refuses regular files
                self._poll = False
            else:
                return os.read(self._fd, 1 << 16)
        return await anyio.to_thread.run_sync(os.read, self._fd, 1 << 16, abandon_on_cancel=True)


@contextlib.contextmanager
def _claim_stdin() -> Iterator[int]:
    """A private duplicate of fd 0 for the protocol, with fd 0 pointed at the null device meanwhile (as the SDK
    does), so nothing else in the process reads the client's messages."""
    private = os.dup(0)  # OSError when stdin is closed: there is no client to serve
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        yield private
    finally:
        os.dup2(private, 0)
        os.close(private)


# On a stop, after the drain: how long requests already answered by their handlers get for the answer to reach
# the transport before stdin is ended (a request the client itself cancelled is never answered).
_ANSWER_WAIT_S = 0.3


async def serve_stdio(mcp: MCPServer, stop: anyio.Event | None = None, drain: Drain | None = None) -> None:
    """Serve until stdin closes, or until `stop` is set: then `drain` ends the tool calls under way (each with
    its error result, after the grace period), their answers are written, and stdin is ended as if the client
    had closed it, so the session ends in order and stdout carries nothing but whole JSON-RPC messages."""
    lowlevel = mcp._lowlevel_server  # noqa: SLF001 - the SDK's own run_stdio_async does the same
    log.info("serving MCP over stdio (SIGINT or SIGTERM stops the server)")
    with _claim_stdin() as stdin_fd:
        await _serve_stdio(lowlevel, StdinLines(stdin_fd), stop, drain)


async def _serve_stdio(lowlevel: Any, stdin: Any, stop: anyio.Event | None = None,
                       drain: Drain | None = None) -> None:
    unanswered: set[Any] = set()  # ids of the client's requests not answered yet
    async with stdio_server(stdin=stdin) as (read_stream, write_stream):
        inner_send, inner_read = anyio.create_memory_object_stream[Any](0)
        out_send, out_read = anyio.create_memory_object_stream[Any](0)

        async def pump(errors: Any) -> None:  # stdin's messages to the session; a bad line answered at once
            async with inner_send, errors:
                async for item in read_stream:
                    try:
                        if isinstance(item, Exception):
                            log.info("stdin line rejected: %s", str(item).splitlines()[0])
                            await errors.send(_jsonrpc_error(item))
                            continue
                        if isinstance(item.message, types.JSONRPCRequest):
                            unanswered.add(item.message.id)
                        await inner_send.send(item)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # the session is over: what still arrives is dropped

        async def forward() -> None:  # the server's messages to the SDK's stdout writer, answers noted
            async with out_read, write_stream:
                async for item in out_read:
                    if isinstance(item.message, (types.JSONRPCResponse, types.JSONRPCError)):
                        unanswered.discard(item.message.id)
                    await write_stream.send(item)

        async def end_on_stop(stop: anyio.Event) -> None:
            await stop.wait()
            if drain is not None:
                await drain.drain()  # tool calls under way end, each with its error result
            with anyio.move_on_after(_ANSWER_WAIT_S):
                while unanswered:
                    await anyio.sleep(0.01)
            stdin.end()  # as if the client closed stdin: the session ends, answering what is left

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, out_send.clone())
            tg.start_soon(forward)
            async with anyio.create_task_group() as session:
                if stop is not None:
                    session.start_soon(end_on_stop, stop)
                await lowlevel.run(inner_read, out_send, lowlevel.create_initialization_options())
                session.cancel_scope.cancel()
            stdin.end()  # read no more; the pump and the writer finish what they hold
