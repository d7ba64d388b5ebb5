"""Connection timeouts uvicorn does not have: a request's headers and its body must arrive in time.

uvicorn closes a keep-alive connection idle past `timeout_keep_alive` (our `limits.keep_alive_timeout_s`), but only
after a first response: a connection that opens and sends nothing, or trickles its headers or its body a byte at
a time (slow loris), holds a socket and a task forever. This h11 protocol (the one uvicorn runs without
httptools) adds two timers per connection:

- headers: from the connection opening (or from the first byte after an idle keep-alive wait), the request head
  must be complete within `limits.header_timeout_s`; else the connection is closed, with a 408 when part of a
  request came (a connection that sent nothing is closed silently);
- body: from the head, the whole body must arrive within `limits.body_timeout_s`; else 408 and close (the app
  reading it sees the client disconnect).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_BODY = b'{"error": {"message": "request timeout: %s", "type": "invalid_request_error", "code": "request_timeout"}}'


def timed_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header and body timers (pass as `uvicorn.Config(http=...)`)."""

    class TimedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _waiting_for: str | None = None  # "headers" | "body": what the running timer waits for

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers", header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                self._disarm()
                return
            state = self.conn.their_state
            if state is h11.IDLE:  # a head under way (or pipelined data): its own clock
                if self._waiting_for != "headers":
                    self._arm("headers", header_timeout_s)
            elif state is h11.SEND_BODY:
                if self._waiting_for != "body":
                    self._arm("body", body_timeout_s)
            else:  # the request is in: the app has it, the response takes the time it takes
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # idle from here on: uvicorn's keep-alive timer
            super().on_response_complete()

        def _arm(self, what: str, seconds: float) -> None:
            self._disarm()
            self._waiting_for = what
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._waiting_for = None, None

        def _expired(self) -> None:
            what, self._timer, self._waiting_for = self._waiting_for, None, None
            if self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            if what == "headers":
                partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
                if partial:
                    log.info("closed the connection from %s: its request headers were incomplete after %g s (408)",
                             client, header_timeout_s)
                    self._send_408(f"the request headers did not arrive within {header_timeout_s:g} s")
                else:
                    log.debug("closed an idle connection from %s after %g s", client, header_timeout_s)
                self.transport.close()
                return
            log.info("closed the connection from %s: its request body was incomplete after %g s (408)", client,
                     body_timeout_s)
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self._send_408(f"the request body did not arrive within {body_timeout_s:g} s")
            if cycle is not None:  # the app reading the body sees the client gone; what it sends is dropped
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        def _send_408(self, why: str) -> None:
            body = _BODY % why.encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event) or b"")
            except h11.LocalProtocolError:  # h11 cannot answer in this state: the close alone
                pass

    return TimedH11Protocol
