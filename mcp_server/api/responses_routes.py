"""The Responses routes: POST /v1/responses (streamed or not), GET /v1/responses/{id}, GET
/v1/responses/{id}/input_items, DELETE /v1/responses/{id}. The request maps to the one pipeline (responses.py);
stored responses live in a ResponseStore (response_store.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from deepseek_mcp.mcp_server.api import responses as rs
from deepseek_mcp.mcp_server.api.errors import Flavor, from_exception, invalid, shutting_down
from deepseek_mcp.mcp_server.api.requests import ResponsesRequest
from deepseek_mcp.mcp_server.api.response_store import ResponseStore, StoredResponse, input_items_page
from deepseek_mcp.mcp_server.api.responses_stream import ResponseStream
from deepseek_mcp.mcp_server.api.sse import EventStreamResponse, Write
from deepseek_mcp.mcp_server.failures import RequestError
from deepseek_mcp.mcp_server.pipeline import Choice, Plan, Prepared
from deepseek_mcp.mcp_server.service import ChatService
from deepseek_mcp.mcp_server.shutdown import Drain

log = logging.getLogger(__name__)

Body = Callable[[Request, Any], Awaitable[Any]]
Complete = Callable[[Request, Prepared], Awaitable["list[Choice] | None"]]


class ResponsesRoutes:
    def __init__(self, service: ChatService, *, body: Body, model: Callable[[str], str],
                 ready: Callable[[], None], complete: Complete, drain: Drain) -> None:
        self.service = service
        self.store = ResponseStore(service.config.limits)
        self._body, self._model, self._ready, self._complete = body, model, ready, complete
        self.drain = drain  # the server's stop: it ends a live stream with the API's error events

    async def create(self, request: Request, flavor: Flavor) -> Response:
        req: ResponsesRequest = await self._body(request, ResponsesRequest)
        model = self._model(req.model)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id, "previous_response_id").history
        tools = rs.tool_plan(req.tools, req.tool_choice)
        if tools.custom and self.service.constraints is None:
            raise invalid("custom tools need constrained decoding, which this server runs without "
                          "(constrained_decoding is off, or xgrammar is not installed); use function tools", "tools")
        items = rs.input_items(req.input)
        new = rs.template_messages(items)
        plan = rs.responses_plan(req, model, history, new, tools)
        rid = rs.new_id("resp")
        plan.caller, plan.request_id = "responses", rid
        self._ready()
        prep = await self._prepare(plan)
        self.service.check_queue(prep)
        settings = rs.echo(req, model, tools)
        summary = req.reasoning is not None and bool(req.reasoning.summary or req.reasoning.generate_summary)
        store = req.store is not False

        def keep(c: Choice, output: list[dict[str, Any]], response: dict[str, Any]) -> None:
            if store:
                messages = history + new + [rs.assistant_message(output)]
                self.store.put(StoredResponse(rid, len(prep.prompt_ids) + len(c.run.token_ids), rs.dumps(messages),
                                              rs.dumps(items), rs.dumps(response)))

        if not req.stream:
            choices = await self._complete(request, prep)
            if choices is None:
                return Response(status_code=499)
            c = choices[0]
            output = rs.output_items(plan, c, tools, summary)
            response = rs.response_object(rid, int(time.time()), settings, rs.status_of(c), output, rs.usage(c))
            keep(c, output, response)
            return JSONResponse(response)

        async def produce(write: Write) -> None:
            stream = ResponseStream(plan, tools, rid, settings, write, summary, keep)
            await stream.begin()
            try:
                with self.drain.guard(f"responses {rid} (stream)") as guard:
                    await self.service.run_streaming(prep, stream.on_item)
                if guard.aborted:  # the server's stop ended it: the stop logged it
                    await stream.fail(shutting_down())
                    return
            except Exception as e:  # headers are sent: the failure becomes the stream's last events
                if isinstance(e, OSError):  # the client went away mid-write
                    raise
                err = from_exception(e)
                log.info("responses %s: stream failed: %d %s", rid, err.status, err.message)
                await stream.fail(err)

        return EventStreamResponse(produce, label=f"responses {rid}")

    async def _prepare(self, plan: Plan) -> Prepared:
        """The pipeline's prepare; its messages name this API's fields (max_output_tokens, input)."""
        try:
            return await self.service.prepare(plan)
        except RequestError as e:
            text = str(e).replace("max_tokens", "max_output_tokens").replace("response_format", "text.format")
            text = text.replace("thinking_budget", "the reasoning budget (reasoning.effort)")
            param = "text.format" if text.startswith("text.format") else "max_output_tokens" \
                if "max_output_tokens" in text else "tools" if "tool" in text else None
            if "the prompt is" in text or "shorten the prompt" in text:
                param = "input"
            raise invalid(text, param) from None

    async def retrieve(self, request: Request, flavor: Flavor) -> Response:
        return JSONResponse(self.store.get(request.path_params["response_id"]).response)

    async def delete(self, request: Request, flavor: Flavor) -> Response:
        response_id = request.path_params["response_id"]
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, request: Request, flavor: Flavor) -> Response:
        entry = self.store.get(request.path_params["response_id"])
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            raise invalid("limit must be an integer", "limit") from None
        return JSONResponse(input_items_page(entry.input_items, order=q.get("order", "desc"), limit=limit,
                                             after=q.get("after")))
