"""One generation request on the AsyncEngine: progress heartbeats, the wall-time limit, and abort on cancel."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio

from mcp_server.progress import Progress

log = logging.getLogger(__name__)

# After the time limit aborts a request, how long to wait for the engine to end its stream before giving up on it.
_ABORT_GRACE_S = 5.0


def new_request_id() -> str:
    """The id a request carries in the engine, the logs and error messages."""
    return f"mcp-{uuid.uuid4().hex[:16]}"


@dataclass
class RunResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | time | cancelled
    prompt_tokens: int
    cached_tokens: int
    elapsed_s: float


@dataclass
class _Live:
    """What the heartbeat reports while the request runs."""

    started: float
    max_tokens: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    def message(self, now: float) -> str:
        n = len(self.token_ids)
        if n == 0:
            return f"prefilling {self.prompt_tokens} prompt tokens ({now - self.started:.0f} s)"
        rate = n / max(now - (self.first_token_at or now), 1e-6) if n > 1 else 0.0
        return f"generated {n}/{self.max_tokens} tokens ({rate:.1f} tok/s)"


async def run_request(
    aengine: Any,
    prompt_ids: list[int],
    params: Any,
    *,
    processors: Sequence[Any] = (),
    progress: Progress | None = None,
    time_limit_s: float,
    interval_s: float = 0.5,
    on_text: Callable[[str], None] | None = None,
    request_id: str | None = None,
) -> RunResult:
    """Stream one request to the end. A cancelled caller aborts it (freeing its cache) before unwinding."""
    progress = progress or Progress()
    request_id = request_id or new_request_id()
    live = _Live(started=time.monotonic(), max_tokens=params.max_tokens, prompt_tokens=len(prompt_ids))
    texts: list[str] = []
    finish: str | None = None
    timed_out = False
    cached = 0
    stream_scope = anyio.CancelScope()

    async def heartbeat() -> None:
        nonlocal timed_out
        deadline = live.started + time_limit_s
        while True:
            now = time.monotonic()
            await progress.update(len(live.token_ids), live.max_tokens, live.message(now))
            if not timed_out and now >= deadline:
                timed_out = True
                log.info("request %s hit the %.1f s time limit after %d tokens", request_id, time_limit_s,
                         len(live.token_ids))
                aengine.abort(request_id)
                stream_scope.deadline = now + _ABORT_GRACE_S  # the engine ends the stream; don't wait forever
            wake = now + interval_s if timed_out else min(now + interval_s, deadline)
            await anyio.sleep(max(wake - time.monotonic(), 0.0))

    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            try:
                with stream_scope:
                    stream = aengine.stream(prompt_ids, params, request_id=request_id,
                                            logits_processors=processors)
                    async with aclosing(stream):
                        async for out in stream:
                            if out.new_token_ids and live.first_token_at is None:
                                live.first_token_at = time.monotonic()
                            live.token_ids = out.token_ids  # a fresh list per update (a slice)
                            cached = out.num_cached_tokens or 0
                            if out.text_delta:
                                texts.append(out.text_delta)
                                if on_text is not None:
                                    on_text(out.text_delta)
                            if out.finished:
                                finish = out.finish_reason
                                break
            except Exception as e:  # re-raised below as itself, not wrapped in the task group's ExceptionGroup
                error = e
            tg.cancel_scope.cancel()
    finally:
        if finish is None:
            aengine.abort(request_id)  # cancelled caller, or an error: free the request's cache blocks now
    if error is not None:
        raise error

    if finish in ("stop", "length"):
        reason = finish  # also when it finished just as the time limit struck
    elif timed_out:
        reason = "time"
    else:
        reason = "cancelled"  # aborted by someone else (e.g. engine shutdown) or the stream ended early
    return RunResult(live.token_ids, "".join(texts), reason, len(prompt_ids), cached,
                     time.monotonic() - live.started)
