"""Graceful stop of the HTTP server (SIGTERM/SIGINT): stop admitting, let the requests under way finish within a
grace period, then end the rest the way their API ends a failed request, and only then let uvicorn close the
connections (so nothing is left for it to cancel, and nothing logs a traceback).

`Drain.middleware` wraps the whole ASGI app and tracks every HTTP request. The API's routes run their work
inside `Drain.guard(label)`: when the grace period is over the drain cancels those guards first, and each route
ends its response itself (a stream with its API's error event, a plain request with a 503 in its API's shape).
Whatever is still open after that (an MCP stream) is cancelled by the middleware, which ends its response (a
503 if nothing was sent yet, else the end of the body). MCP tool calls run inside guards too (server.py) and end
with an error result; over stdio, where there is no HTTP request, the tool calls are the guards the drain waits
for (transports.serve_stdio ends stdin once their answers are out). One INFO line per request the stop aborted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# After the guards are cancelled: how long their routes get to write their last event, and after the middleware
# cancels what is left, how long those requests get to unwind.
_GUARD_UNWIND_S = 0.3
_UNWIND_S = 0.2

SHUTTING_DOWN = "the server is shutting down; retry against another replica, or once it is back"


@dataclass(eq=False)
class Guard:
    """One API request's work; `aborted` once the stop has cancelled it."""

    label: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    aborted: bool = False


@dataclass(eq=False)
class _Live:
    method: str
    path: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: bool = False  # the response's status line went out
    complete: bool = False  # its last body chunk went out


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._requests: set[_Live] = set()
        self._guards: set[Guard] = set()
        self._finished: anyio.Event | None = None

    # -- the API's work -------------------------------------------------------------------------------

    @contextmanager
    def guard(self, label: str) -> Iterator[Guard]:
        """Run a request's work so the stop can cancel it; the caller checks `aborted` afterwards."""
        g = Guard(label)
        self._guards.add(g)
        try:
            with g.scope:
                yield g
        finally:
            self._guards.discard(g)

    # -- every HTTP request ---------------------------------------------------------------------------

    def middleware(self, app: ASGIApp, answers_itself: Callable[[str], bool]) -> ASGIApp:
        """`app` with every HTTP request tracked. While draining, a new request is refused with a 503 unless
        `answers_itself(path)` (the API's routes refuse in their API's own shape)."""

        async def tracked(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if self.draining and not answers_itself(scope.get("path", "")):
                await _refuse(send)
                return
            live = _Live(scope.get("method", ""), scope.get("path", ""))

            async def send_tracked(message: Message) -> None:
                if message["type"] == "http.response.start":
                    live.started = True
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    live.complete = True
                await send(message)

            self._requests.add(live)
            try:
                with live.scope:
                    await app(scope, receive, send_tracked)
            finally:
                self._requests.discard(live)
            if live.scope.cancelled_caught:  # the stop cut it: end the response cleanly
                try:
                    if not live.started:
                        await _refuse(send)
                    elif not live.complete:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass

        return tracked

    # -- the stop -------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new requests, give those under way `grace_s`, then end them. Idempotent: a second caller
        (a second port) waits for the first."""
        if self._finished is not None:
            await self._finished.wait()
            return
        self._finished = anyio.Event()
        try:
            self.draining = True
            started = time.monotonic()
            if self._requests or self._guards:
                log.info("stopping: refusing new requests; %d under way get %.1f s to finish",
                         max(len(self._requests), len(self._guards)), self.grace_s)
            await self._wait_idle(self.grace_s)
            for g in list(self._guards):
                g.aborted = True
                log.info("stopping: aborted %s", g.label)
                g.scope.cancel()
            if self._guards:
                await self._wait_idle(_GUARD_UNWIND_S)
            for live in list(self._requests):
                log.info("stopping: aborted %s %s", live.method, live.path)
                live.scope.cancel()
            await self._wait_idle(_UNWIND_S)
            if self._requests:
                log.info("stopping: %d requests did not end after %.1f s", len(self._requests),
                         time.monotonic() - started)
        finally:
            self._finished.set()

    async def _wait_idle(self, limit_s: float) -> None:
        """Until no HTTP request and no guarded work (an MCP tool call over stdio has no HTTP request) is left."""
        with anyio.move_on_after(limit_s):
            while self._requests or self._guards:
                await anyio.sleep(0.01)


async def _refuse(send: Send) -> None:
    body = json.dumps({"error": {"message": SHUTTING_DOWN, "type": "server_error", "param": None,
                                 "code": "shutting_down"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
