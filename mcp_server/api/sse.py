"""A server-sent-events response driven by a producer coroutine (not a generator, so the producer may run its
own task groups). A client that disconnects cancels the producer, which aborts its engine requests (their
cache blocks are free before the next step)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

Write = Callable[[bytes], Awaitable[None]]
Producer = Callable[[Write], Awaitable[None]]


def sse(data: str, event: str | None = None) -> bytes:
    return (f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n").encode()


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, produce: Producer, headers: dict[str, str] | None = None, label: str = "stream") -> None:
        # no `body`: init_headers then writes no Content-Length (the stream is chunked)
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.produce = produce
        self.label = label  # route and response id, for the log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = anyio.Lock()

        async def write(data: bytes) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": data, "more_body": True})

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        disconnected = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal disconnected
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        disconnected = True
                        log.info("%s: client disconnected mid-stream; its requests are aborted", self.label)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            try:
                await self.produce(write)
            except Exception as e:
                if not _connection_lost(e):  # a bug: the log has it; the client sees the stream end
                    log.exception("event stream failed")
                disconnected = True
            tg.cancel_scope.cancel()
        if not disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _connection_lost(exc: BaseException) -> bool:
    """An OSError from writing to a closed connection, possibly inside task groups' ExceptionGroups."""
    group = getattr(exc, "exceptions", None)  # an (exceptiongroup's, before 3.11) ExceptionGroup
    if isinstance(group, tuple) and group:
        return all(_connection_lost(e) for e in group)
    return isinstance(exc, OSError)
