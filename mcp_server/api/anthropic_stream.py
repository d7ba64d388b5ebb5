"""The Anthropic Messages event stream: `message_start`; per content block `content_block_start`,
`content_block_delta` (`thinking_delta` then a `signature_delta`; `text_delta`; one `input_json_delta` per
tool_use with its whole input, sent when the call closes, so that the stream never delivers argument text the
final message contradicts) and `content_block_stop`; `message_delta` (stop_reason, usage); `message_stop`.
`ping` goes out while the prompt is prefilled (nothing decoded yet). Blocks follow the order the model wrote:
text after a tool call opens a new text block."""

from __future__ import annotations

import json
from typing import Any

import anyio

from deepseek_mcp.inference.text.parse import (
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
)
from deepseek_mcp.mcp_server.api.anthropic_messages import input_json, signature, stop_reason, tool_use_id, usage
from deepseek_mcp.mcp_server.api.sse import Write, sse
from deepseek_mcp.mcp_server.pipeline import Choice, Plan, call_limit, new_call_id

PING_INTERVAL_S = 1.0


class MessageStream:
    def __init__(self, plan: Plan, model: str, message_id: str, write: Write, prompt_tokens: int) -> None:
        self.plan, self.model, self.id, self.write = plan, model, message_id, write
        self.prompt_tokens = prompt_tokens
        self.index = -1
        self.open: Any = None  # "thinking" | "text" | ("tool", call index) | None
        self.reasoning: list[str] = []
        self.decoding = False  # set by the first decoded text: pings stop

    async def event(self, kind: str, **body: Any) -> None:
        await self.write(sse(json.dumps({"type": kind, **body}, ensure_ascii=False), event=kind))

    async def begin(self) -> None:
        await self.event("message_start", message={
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}})

    async def pings(self) -> None:
        while not self.decoding:
            await anyio.sleep(PING_INTERVAL_S)
            if not self.decoding:
                await self.event("ping")

    async def _close(self) -> None:
        if self.open is None:
            return
        if self.open == "thinking":
            await self.event("content_block_delta", index=self.index,
                             delta={"type": "signature_delta", "signature": signature("".join(self.reasoning))})
        await self.event("content_block_stop", index=self.index)
        self.open = None

    async def _ensure(self, key: Any, block: dict[str, Any] | None = None) -> None:
        if self.open == key:
            return
        await self._close()
        self.index += 1
        self.open = key
        if block is None:
            block = {"type": "thinking", "thinking": "", "signature": ""} if key == "thinking" else \
                {"type": "text", "text": ""}
        await self.event("content_block_start", index=self.index, content_block=block)

    async def on_item(self, index: int, item: tuple[str, list[Event]] | Choice) -> None:
        if isinstance(item, Choice):
            await self._end(item)
            return
        limit = call_limit(self.plan)
        for ev in _merged(item[1]):
            self.decoding = True
            if isinstance(ev, ReasoningDelta):
                self.reasoning.append(ev.text)
                await self._ensure("thinking")
                await self.event("content_block_delta", index=self.index,
                                 delta={"type": "thinking_delta", "thinking": ev.text})
            elif isinstance(ev, ContentDelta):
                await self._ensure("text")
                await self.event("content_block_delta", index=self.index, delta={"type": "text_delta",
                                                                                  "text": ev.text})
            elif isinstance(ev, ToolCallStarted) and ev.index < limit:
                await self._ensure(("tool", ev.index), {"type": "tool_use", "id": tool_use_id(new_call_id()),
                                                        "name": ev.name, "input": {}})
            elif isinstance(ev, ToolCallFinished) and self.open == ("tool", ev.index):
                # the arguments go whole, once the call is closed and parsed: the same `input` as the
                # non-streamed message, `{}` when they are not a JSON object (anthropic_messages.tool_input)
                await self.event("content_block_delta", index=self.index,
                                 delta={"type": "input_json_delta", "partial_json": input_json(ev.call)})
                await self._close()

    async def _end(self, c: Choice) -> None:
        self.decoding = True
        await self._close()
        u = usage(c)
        await self.event("message_delta", delta={"stop_reason": stop_reason(c), "stop_sequence": c.stop_sequence},
                         usage={"output_tokens": u["output_tokens"], "input_tokens": u["input_tokens"],
                                "cache_read_input_tokens": u["cache_read_input_tokens"]})
        await self.event("message_stop")


def _merged(events: list[Event]) -> list[Event]:
    """Adjacent reasoning, text or same-call argument pieces of one batch as one event each."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, ReasoningDelta) and isinstance(prev, ReasoningDelta):
            out[-1] = ReasoningDelta(prev.text + ev.text)
        elif isinstance(ev, ContentDelta) and isinstance(prev, ContentDelta):
            out[-1] = ContentDelta(prev.text + ev.text)
        elif isinstance(ev, ToolArgumentsDelta) and isinstance(prev, ToolArgumentsDelta) and prev.index == ev.index:
            out[-1] = ToolArgumentsDelta(ev.index, prev.text + ev.text)
        else:
            out.append(ev)
    return out
