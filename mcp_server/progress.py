"""Progress notifications for one tool call: strictly increasing values, failures never break the call."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

log = logging.getLogger(__name__)

SendProgress = Callable[[float, "float | None", "str | None"], Awaitable[None]]

# The MCP spec requires each notification's progress to exceed the last. While nothing advances (model loading,
# queued, long prefill) heartbeats still go out, nudged up by this much each time.
_NUDGE = 1e-3


class Progress:
    """Sends `notifications/progress` for one request (a no-op sink when the client passed no progress token)."""

    def __init__(self, send: SendProgress | None = None) -> None:
        self._send = send
        self._last = -1.0
        self.sent = 0

    async def update(self, progress: float, total: float | None, message: str) -> None:
        if self._send is None:
            return
        value = max(float(progress), self._last + _NUDGE)
        self._last = value
        try:
            await self._send(value, total, message)
            self.sent += 1
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # a closed stream must not fail the generation; the call ends elsewhere
            log.debug("progress notification failed: %r", e)

