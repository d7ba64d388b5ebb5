"""API errors, shaped per API: OpenAI `{"error": {message, type, param, code}}`, Anthropic
`{"type": "error", "error": {type, message}}`. Service exceptions map to statuses here, in one place."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError
from starlette.responses import JSONResponse

from deepseek_mcp.mcp_server.failures import GenerationFailed, GenerationTimeout, RequestError, ServerBusy
from deepseek_mcp.mcp_server.model_host import ModelUnavailable
from deepseek_mcp.mcp_server.shutdown import SHUTTING_DOWN

log = logging.getLogger(__name__)

Flavor = Literal["openai", "anthropic"]

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 500: "server_error", 503: "server_error",
                 504: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    408: "timeout_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                    504: "timeout_error"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self, flavor: Flavor) -> dict[str, object]:
        if flavor == "anthropic":
            return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                               "message": self.message}}
        return {"error": {"message": self.message, "type": _OPENAI_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self, flavor: Flavor) -> JSONResponse:
        return JSONResponse(self.body(flavor), status_code=self.status, headers=self.headers)

    def sse(self, flavor: Flavor) -> bytes:
        """The error as the stream's last event (the status line is long gone): Anthropic's `error` event; for
        OpenAI a chunk holding `error`, then `data: [DONE]` as every OpenAI stream ends (as vLLM does)."""
        data = json.dumps(self.body(flavor), ensure_ascii=False)
        if flavor == "anthropic":
            return f"event: error\ndata: {data}\n\n".encode()
        return f"data: {data}\n\ndata: [DONE]\n\n".encode()


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_request")


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"`{param}` is not supported by this server: {why}", param=param, code="unsupported")


def shutting_down() -> ApiError:
    """The server's stop refusing or ending a request (503; the client may retry elsewhere or later)."""
    return ApiError(503, SHUTTING_DOWN, code="shutting_down", headers={"Retry-After": "5", "Connection": "close"})


def from_validation(err: ValidationError) -> ApiError:
    """One line per problem, each naming its field (the first one is the error's `param`)."""
    lines, first = [], None
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(body)"
        first = first or where
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{where}: {msg}")
    return invalid("; ".join(lines) or "invalid request", first)


def from_exception(exc: Exception, load_wait_hint_s: int = 5) -> ApiError:
    """A service/engine exception as an ApiError; anything unexpected is logged with its traceback and
    reported without it."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return invalid(str(exc), _param_of(str(exc)))
    if isinstance(exc, RecursionError):  # input nested past what the parsers and schema checks walk
        return invalid("the request nests too deeply (JSON, or a JSON schema in tools or response_format); "
                       "flatten it")
    if isinstance(exc, GenerationTimeout):  # a server-side limit, never the client's error
        return ApiError(504, str(exc), code="timeout")
    if isinstance(exc, ServerBusy):
        return ApiError(429, str(exc), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, ModelUnavailable):
        headers = {"Retry-After": str(load_wait_hint_s)} if "still loading" in str(exc) else {}
        return ApiError(503, str(exc), code="model_unavailable", headers=headers)
    if isinstance(exc, GenerationFailed):
        return ApiError(500, str(exc), code="generation_failed")
    log.error("unexpected API failure", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    code="internal_error")


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "messages", "tools", "tool_choice", "response_format", "thinking_budget", "stop"):
        if message.startswith(name) or f" {name} " in message[:40]:
            return name
    return None
