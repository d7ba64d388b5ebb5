"""What a request can end in besides its result: `RequestError`, the client's to fix (HTTP 400, an MCP error
result), and `GenerationFailed` with its kinds, the server's (`ServerBusy`: 429, `GenerationTimeout`: 504,
anything else: 500). Each front end maps them to its own wire format."""

from __future__ import annotations


class RequestError(ValueError):
    """Input the server cannot serve; the message says what to change."""


class GenerationFailed(RuntimeError):
    """The engine failed while generating (the cause is in the message); the server goes on serving."""


class ServerBusy(GenerationFailed):
    """The engine's request queue is full; nothing was queued. Retry in a little while."""


class GenerationTimeout(GenerationFailed):
    """The server's wall-time limit ended the request before its first output token: a server-side limit."""
