"""The Responses event stream: parser events -> typed events, each with its `sequence_number`.

response.created, response.in_progress; per output item response.output_item.added ... .done, in the order
the model writes them: a `reasoning` item (content_part.added with a reasoning_text part, reasoning_text.delta /
.done, content_part.done; with `reasoning.summary` also reasoning_summary_part.added, reasoning_summary_text.delta
/ .done and reasoning_summary_part.done carrying the same text), a `message` (content_part.added, output_text.delta
/ .done, content_part.done), a `function_call` (function_call_arguments.delta / .done) or `custom_tool_call`
(custom_tool_call_input.delta / .done); then response.completed or response.incomplete with the whole
Response, whose output is the items the deltas built. A failure after the stream started sends an `error`
event and then response.failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from deepseek_mcp.inference.text.parse import (
    ContentDelta,
    ReasoningDelta,
    ToolArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
)
from deepseek_mcp.mcp_server.api.errors import ApiError
from deepseek_mcp.mcp_server.api.responses import (
    Tools,
    call_item,
    message_item,
    new_id,
    reasoning_item,
    response_object,
    status_of,
    usage,
)
from deepseek_mcp.mcp_server.api.sse import Write, sse
from deepseek_mcp.mcp_server.pipeline import Choice, Item, Plan, call_limit, new_call_id


class ResponseStream:
    def __init__(self, plan: Plan, tools: Tools, rid: str, settings: dict[str, Any], write: Write,
                 summary: bool, on_done: Callable[[Choice, list[dict[str, Any]], dict[str, Any]], None]) -> None:
        self.plan, self.tools, self.id, self.settings, self.write = plan, tools, rid, settings, write
        self.summary = summary
        self.on_done = on_done  # (choice, output, response): store it before the last event goes out
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # the items, done or open
        self.open: dict[str, Any] | None = None  # the item being written
        self.text = ""  # its text so far (reasoning, message text, arguments or input)
        self.call_index = -1  # the parser's index of the open call

    async def event(self, kind: str, **body: Any) -> None:
        data = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        await self.write(sse(json.dumps(data, ensure_ascii=False), kind))

    def response(self, status: str, usage_: dict[str, Any] | None = None,
                 error: ApiError | None = None) -> dict[str, Any]:
        return response_object(self.id, self.created, self.settings, status, self.output, usage_, error)

    async def begin(self) -> None:
        await self.event("response.created", response=self.response("in_progress"))
        await self.event("response.in_progress", response=self.response("in_progress"))

    # -- items ------------------------------------------------------------------------------------------

    @property
    def index(self) -> int:
        return len(self.output) - 1

    async def _add(self, item: dict[str, Any]) -> None:
        await self.close()
        self.output.append(item)
        self.open, self.text = item, ""
        await self.event("response.output_item.added", output_index=self.index, item=item)

    async def _open_text(self, kind: str) -> None:
        if self.open is not None and self.open["type"] == kind:
            return
        if kind == "reasoning":
            await self._add(reasoning_item(new_id("rs"), "", False, "in_progress") | {"content": []})
            part = {"type": "reasoning_text", "text": ""}
            if self.summary:
                await self.event("response.reasoning_summary_part.added", item_id=self.open["id"],
                                 output_index=self.index, summary_index=0, part={"type": "summary_text", "text": ""})
        else:
            await self._add(message_item(new_id("msg"), "", "in_progress") | {"content": []})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await self.event("response.content_part.added", item_id=self.open["id"], output_index=self.index,
                         content_index=0, part=part)

    async def _delta(self, text: str) -> None:
        assert self.open is not None
        self.text += text
        where = {"item_id": self.open["id"], "output_index": self.index}
        kind = self.open["type"]
        if kind == "reasoning":
            await self.event("response.reasoning_text.delta", **where, content_index=0, delta=text)
            if self.summary:
                await self.event("response.reasoning_summary_text.delta", **where, summary_index=0, delta=text)
        elif kind == "message":
            await self.event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[])
        elif kind == "function_call":
            await self.event("response.function_call_arguments.delta", **where, delta=text)
        else:
            await self.event("response.custom_tool_call_input.delta", **where, delta=text)

    async def close(self, status: str = "completed") -> None:
        """Finish the open item: its .done events, then output_item.done with the whole item."""
        item, text = self.open, self.text
        if item is None:
            return
        self.open = None
        where = {"item_id": item["id"], "output_index": self.index}
        kind = item["type"]
        if kind == "reasoning":
            done = reasoning_item(item["id"], text, self.summary, status)
            await self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            await self.event("response.content_part.done", **where, content_index=0, part=done["content"][0])
            if self.summary:
                await self.event("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
                await self.event("response.reasoning_summary_part.done", **where, summary_index=0,
                                 part=done["summary"][0])
        elif kind == "message":
            done = message_item(item["id"], text, status)
            await self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            await self.event("response.content_part.done", **where, content_index=0, part=done["content"][0])
        else:
            custom = kind == "custom_tool_call"
            done = call_item(item["id"], item["call_id"], item["name"], text, custom, status)
            if custom:
                await self.event("response.custom_tool_call_input.done", **where, input=text)
            else:
                await self.event("response.function_call_arguments.done", **where, name=item["name"],
                                 arguments=text)
        self.output[self.index] = done
        await self.event("response.output_item.done", output_index=self.index, item=done)

    # -- the pipeline's items ---------------------------------------------------------------------------

    async def on_item(self, index: int, item: Item | Choice) -> None:
        if isinstance(item, Choice):
            await self.end(item)
            return
        _, events, _ = item
        limit = call_limit(self.plan)
        for ev in events:
            if isinstance(ev, ReasoningDelta) and ev.text:
                await self._open_text("reasoning")
                await self._delta(ev.text)
            elif isinstance(ev, ContentDelta) and ev.text:
                await self._open_text("message")
                await self._delta(ev.text)
            elif isinstance(ev, ToolCallStarted) and ev.index < limit:
                custom = ev.name in self.tools.custom
                await self._add(call_item(new_id("ctc" if custom else "fc"), new_call_id(), ev.name, "", custom,
                                          "in_progress"))
                self.call_index = ev.index
            elif isinstance(ev, ToolArgumentsDelta) and self._in_call(ev.index) and ev.text:
                await self._delta(ev.text)
            elif isinstance(ev, ToolCallFinished) and self._in_call(ev.index):
                await self.close()

    def _in_call(self, index: int) -> bool:
        return self.open is not None and self.open["type"] in ("function_call", "custom_tool_call") \
            and index == self.call_index

    async def end(self, c: Choice) -> None:
        status = status_of(c)
        await self.close("incomplete" if status == "incomplete" else "completed")
        response = self.response(status, usage(c))
        self.on_done(c, self.output, response)
        await self.event("response.completed" if status == "completed" else "response.incomplete",
                         response=response)

    async def fail(self, err: ApiError) -> None:
        """A failure after the stream started: an `error` event, then response.failed."""
        await self.event("error", code=err.code, message=err.message, param=err.param)
        await self.event("response.failed", response=self.response("failed", error=err))
