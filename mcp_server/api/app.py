"""The API routes as a Starlette app, and how it shares a port with the MCP endpoint.

Same rules as /mcp: Host/Origin validated against DNS rebinding (the SDK's TransportSecurityMiddleware with our
settings), and with a token configured every /v1 route needs it, as `Authorization: Bearer <token>` (OpenAI) or
`x-api-key: <token>` (Anthropic; either works on every route), and so does `GET /metrics` (Prometheus).
`GET /health` needs no token. Without a token any key is accepted (clients insist on sending one). On a stop
(SIGTERM) the routes refuse new requests and end those under way in their API's shape (mcp_server/shutdown.py).
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from mcp.server.transport_security import TransportSecurityMiddleware
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from deepseek_mcp.mcp_server.api import anthropic_messages, completions, openai_chat
from deepseek_mcp.mcp_server.api.anthropic_stream import MessageStream
from deepseek_mcp.mcp_server.api.body import parse_object, read_body
from deepseek_mcp.mcp_server.api.errors import (
    ApiError,
    Flavor,
    from_exception,
    from_validation,
    shutting_down,
)
from deepseek_mcp.mcp_server.api.openai_stream import ChunkStream
from deepseek_mcp.mcp_server.api.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    MessagesRequest,
)
from deepseek_mcp.mcp_server.api.responses_routes import ResponsesRoutes
from deepseek_mcp.mcp_server.api.sse import EventStreamResponse, Write
from deepseek_mcp.mcp_server.hosts import HostGate
from deepseek_mcp.mcp_server.metrics import CONTENT_TYPE
from deepseek_mcp.mcp_server.model_host import DEMO_NAME
from deepseek_mcp.mcp_server.pipeline import Choice, Prepared
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.service import ChatService
from deepseek_mcp.mcp_server.shutdown import Drain
from deepseek_mcp.mcp_server.transports import run_uvicorn, security_settings

log = logging.getLogger(__name__)

ALIASES = ("deepseek-chat", "deepseek-reasoner")
M = TypeVar("M", bound=BaseModel)


def served_model_names(service: ChatService) -> list[str]:
    """`served_model_names`, else the checkpoint's name (`deepseek-v3.1-demo` for the demo) and the aliases
    deepseek-chat / deepseek-reasoner, so clients written for DeepSeek's API run unchanged."""
    if service.config.served_model_names:
        return list(service.config.served_model_names)
    base = "deepseek-v3.1-demo" if service.host.name == DEMO_NAME else service.host.name
    return [base, *(a for a in ALIASES if a != base)]


class ApiApp:
    def __init__(self, service: ChatService, drain: Drain | None = None) -> None:
        self.service = service
        self.config = service.config
        self.drain = drain or Drain(self.config.limits.shutdown_grace_s)
        self.names = served_model_names(service)
        self.security = TransportSecurityMiddleware(security_settings(self.config))
        self._token = self.config.token.encode() if self.config.token else None
        self.responses = ResponsesRoutes(service, body=self._body, model=self._model,
                                         ready=lambda: check_ready(service), complete=self._complete,
                                         drain=self.drain)
        responses = self.responses
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.guarded(self.metrics, None), methods=["GET"]),
            Route("/v1/models", self.guarded(self.models, None), methods=["GET"]),
            Route("/v1/chat/completions", self.guarded(self.chat, "openai"), methods=["POST"]),
            Route("/v1/completions", self.guarded(self.completions, "openai"), methods=["POST"]),
            Route("/v1/messages", self.guarded(self.messages, "anthropic"), methods=["POST"]),
            Route("/v1/messages/count_tokens", self.guarded(self.count_tokens, "anthropic"), methods=["POST"]),
            Route("/v1/responses", self.guarded(responses.create, "openai"), methods=["POST"]),
            Route("/v1/responses/{response_id}", self.guarded(responses.retrieve, "openai"), methods=["GET"]),
            Route("/v1/responses/{response_id}", self.guarded(responses.delete, "openai"), methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.guarded(responses.input_items, "openai"),
                  methods=["GET"]),
            Route("/v1/{rest:path}", self.guarded(self.unknown, None), methods=["GET", "POST", "PUT", "DELETE"]),
        ]
        self.app = Starlette(routes=routes)

    # -- composition ----------------------------------------------------------------------------------

    def mount(self, mcp_app: ASGIApp) -> ASGIApp:
        """One ASGI app: /health and /v1/* here, everything else (and the lifespan) to the MCP app."""
        api = self.app
        log.info("serving the OpenAI/Anthropic API at /v1 (models %s)", ", ".join(self.names))

        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
            await (api if owns(path) else mcp_app)(scope, receive, send)

        return self.drain.middleware(dispatch, owns)

    def asgi(self) -> ASGIApp:
        """The API alone (beside a stdio MCP server), its requests tracked for a graceful stop."""
        return self.drain.middleware(self.app, owns)

    # -- guards ---------------------------------------------------------------------------------------

    def guarded(self, handler: Callable[[Request, Flavor], Awaitable[Response]],
                flavor: Flavor | None) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            shape: Flavor = flavor or ("anthropic" if "anthropic-version" in request.headers else "openai")
            refused = await self.security.validate_request(request, is_post=False)
            if refused is not None:
                return refused
            try:
                self._check_token(request)
                if self.drain.draining:
                    raise shutting_down()
                with self.drain.guard(f"{request.method} {request.url.path}") as request.state.guard:
                    return await handler(request, shape)
                raise shutting_down()  # reached only when the stop cancelled the handler
            except ClientDisconnect:  # gone while its body was read: nothing to answer
                log.info("%s %s: client disconnected before its request was read", request.method,
                         request.url.path)
                return Response(status_code=499)
            except Exception as e:  # every failure in the API's own shape; tracebacks only in the log
                err = from_exception(e)
                if err.code != "shutting_down":  # the stop logs what it aborted
                    log.info("%s %s: %d %s", request.method, request.url.path, err.status, err.message)
                return err.response(shape)

        return endpoint

    def _check_token(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), self._token):
            raise ApiError(401, "missing or wrong API key: send the server's token as 'Authorization: Bearer "
                                "<token>' or 'x-api-key: <token>'", code="invalid_api_key")

    async def _body(self, request: Request, model: type[M]) -> M:
        """The body within `limits.max_request_bytes` and MAX_JSON_DEPTH (api/body.py), validated as `model`."""
        data = parse_object(await read_body(request, self.config.limits.max_request_bytes))
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise from_validation(e) from None

    def _model(self, name: str) -> str:
        if name not in self.names:
            raise openai_chat.model_error(name, self.names)
        return name

    # -- routes ---------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        refused = await self.security.validate_request(request, is_post=False)
        if refused is not None:
            return refused
        host = self.service.host
        status = "stopping" if self.drain.draining else {"ready": "ok"}.get(host.status, host.status)
        body = {"status": status, "model": self.names[0], "error": host.error}
        headers = {"Retry-After": "5"} if status == "loading" else {}
        return JSONResponse(body, status_code=200 if status == "ok" else 503, headers=headers)

    async def metrics(self, request: Request, flavor: Flavor) -> Response:
        return Response(self.service.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: Request, flavor: Flavor) -> Response:
        created = int(time.time())
        if flavor == "anthropic":
            data = [{"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z"}
                    for n in self.names]
            return JSONResponse({"data": data, "has_more": False, "first_id": self.names[0],
                                 "last_id": self.names[-1]})
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "deepseek-mcp"} for n in self.names]})

    async def unknown(self, request: Request, flavor: Flavor) -> Response:
        raise ApiError(404, f"no route {request.method} {request.url.path}; this server has /v1/models, "
                            "/v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, "
                            "/v1/messages/count_tokens",
                       code="not_found")

    async def chat(self, request: Request, flavor: Flavor) -> Response:
        req = await self._body(request, ChatCompletionRequest)
        model = self._model(req.model)
        plan = openai_chat.chat_plan(req, model)
        rid = "chatcmpl-" + secrets.token_hex(12)
        plan.caller, plan.request_id = "chat.completions", rid
        check_ready(self.service)
        prep = await self.service.prepare(plan)
        self.service.check_queue(prep)
        if not req.stream:
            choices = await self._complete(request, prep)
            if choices is None:
                return Response(status_code=499)
            return JSONResponse(openai_chat.completion_response(plan, choices, model, rid, prep.tokenizer))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def produce(write: Write) -> None:
            stream = ChunkStream(plan, model, rid, write, include_usage, prep.tokenizer)
            await stream.begin()
            if await self._stream(prep, stream.on_item, write, "openai"):
                await stream.end()

        return EventStreamResponse(produce, label=f"chat.completions {rid}")

    async def completions(self, request: Request, flavor: Flavor) -> Response:
        req = await self._body(request, CompletionRequest)
        model = self._model(req.model)
        check_ready(self.service)
        host = self.service.host
        plan = await host.tokenize(functools.partial(completions.completion_plan, req, host.engine.tokenizer))
        rid = "cmpl-" + secrets.token_hex(12)
        plan.caller, plan.request_id = "completions", rid
        prep = await self.service.prepare(plan)
        self.service.check_queue(prep)
        if not req.stream:
            choices = await self._complete(request, prep)
            if choices is None:
                return Response(status_code=499)
            return JSONResponse(completions.completion_response(plan, choices, model, rid, prep.tokenizer))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def produce(write: Write) -> None:
            stream = completions.TextStream(plan, model, rid, write, include_usage, prep.tokenizer)
            if await self._stream(prep, stream.on_item, write, "openai"):
                await stream.end()

        return EventStreamResponse(produce, label=f"completions {rid}")

    async def messages(self, request: Request, flavor: Flavor) -> Response:
        req = await self._body(request, MessagesRequest)
        model = self._model(req.model)
        plan = anthropic_messages.messages_plan(req)
        mid = "msg_" + secrets.token_hex(12)
        plan.caller, plan.request_id = "messages", mid
        check_ready(self.service)
        prep = await self.service.prepare(plan)
        self.service.check_queue(prep)
        if not req.stream:
            choices = await self._complete(request, prep)
            if choices is None:
                return Response(status_code=499)
            return JSONResponse(anthropic_messages.message_response(plan, choices[0], model, mid))

        async def produce(write: Write) -> None:
            stream = MessageStream(plan, model, mid, write, len(prep.prompt_ids))
            await stream.begin()
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.pings)
                await self._stream(prep, stream.on_item, write, "anthropic")
                stream.decoding = True
                tg.cancel_scope.cancel()

        return EventStreamResponse(produce, label=f"messages {mid}")

    async def count_tokens(self, request: Request, flavor: Flavor) -> Response:
        req = await self._body(request, CountTokensRequest)
        self._model(req.model)
        specs, _, _ = anthropic_messages.tool_plan(req)
        thinking = req.thinking is not None and req.thinking.type != "disabled"
        check_ready(self.service)
        messages = anthropic_messages.template_messages(req)
        _, _, ids = await self.service.render(messages, Progress(), thinking=thinking,
                                              tools=[s.as_openai() for s in specs] or None,
                                              continue_final=anthropic_messages.is_prefill(messages))
        return JSONResponse({"input_tokens": len(ids)})

    # -- helpers --------------------------------------------------------------------------------------

    async def _complete(self, request: Request, prep: Prepared) -> list[Choice] | None:
        """Every choice, or None when the client went away first (its requests are aborted)."""
        request.state.guard.label = f"{prep.plan.caller} {prep.plan.request_id}"  # what the stop would abort
        choices = await _until_disconnect(request, lambda: self.service.run_all(prep))
        if choices is None:
            log.info("%s %s: client disconnected; its requests were aborted", prep.plan.caller, prep.plan.request_id)
        return choices

    async def _stream(self, prep: Prepared, on_item: Any, write: Write, flavor: Flavor) -> bool:
        """Run the choices into the stream; a failure, or the server's stop, ends the stream with the API's
        error event (False). Each engine request logs its own line (pipeline.py)."""
        plan = prep.plan
        try:
            with self.drain.guard(f"{plan.caller} {plan.request_id} (stream)") as guard:
                await self.service.run_streaming(prep, on_item)
            if guard.aborted:
                raise shutting_down()
        except Exception as e:  # headers are sent: the error becomes the stream's last event
            err = from_exception(e)
            if err.code != "shutting_down":  # the stop logged it
                log.info("%s %s: stream failed: %d %s", plan.caller, plan.request_id, err.status, err.message)
            await write(err.sse(flavor))
            return False
        return True


def owns(path: str) -> bool:
    """The paths the API answers (the rest go to the MCP app)."""
    return path in ("/health", "/metrics", "/v1") or path.startswith("/v1/")


def check_ready(service: ChatService) -> None:
    """While the model loads: 503 with Retry-After (the API does not wait); after a failed load, or a failure
    while serving: 503 with the cause."""
    host = service.host
    if host.status == "loading":
        raise ApiError(503, f"the model {host.name} is still loading ({host.load_elapsed():.0f} s so far); retry "
                            "shortly (GET /health says when it is ready)", code="model_loading",
                       headers={"Retry-After": "5"})
    if host.status == "failed":
        raise ApiError(503, host.failure_message(), code="model_failed")


async def _until_disconnect(request: Request, work: Callable[[], Awaitable[list[Choice]]]) -> list[Choice] | None:
    """Run `work` unless the client disconnects first (then its requests are aborted: None)."""
    result: list[Choice] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal result, error
            try:
                result = await work()
            except Exception as e:  # raised below as itself, not inside an ExceptionGroup
                error = e
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error is not None:
        raise error
    return result


async def serve_api(api: ApiApp, port: int, stop: anyio.Event | None = None) -> None:
    """The API alone on its own port (beside a stdio MCP server): same host, token and Host/Origin rules."""
    config = api.config
    log.info("serving the OpenAI/Anthropic API at http://%s:%d/v1%s", config.host, port,
             " (token required)" if config.token else "")
    app = HostGate(api.asgi(), security_settings(config).allowed_hosts)
    await run_uvicorn(app, config, port, stop, lifespan="off", drain=api.drain)
