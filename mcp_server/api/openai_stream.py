"""The chat.completion.chunk stream: parser events -> deltas, as they decode, ending with `data: [DONE]`.

Each choice opens with `{"role": "assistant", "content": ""}`; reasoning goes to `reasoning_content` (and
`reasoning`), answer text to `content`, a call's first delta carries its `index`, `id`, `type` and
`function.name` (arguments ""), later ones its argument text as generated. The joined deltas are the
non-streamed message byte for byte, since both are the parser's own segments. Then one chunk per choice with
its `finish_reason` (`tool_calls` only when calls were sent), then usage when `stream_options.include_usage`.
With `logprobs`, each delta carries the entries of the tokens whose text it completes (logprobs.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

from deepseek_mcp.inference.text.parse import ContentDelta, Event, ReasoningDelta, ToolArgumentsDelta, ToolCallStarted
from deepseek_mcp.mcp_server.api.openai_chat import finish_reason, usage
from deepseek_mcp.mcp_server.api.sse import Write, sse
from deepseek_mcp.mcp_server.logprobs import TokenLogprob, chat_logprobs
from deepseek_mcp.mcp_server.pipeline import Choice, Item, Plan, call_limit, new_call_id


def event_deltas(events: list[Event], limit: int, call_ids: dict[int, str]) -> list[dict[str, Any]]:
    """Deltas for a batch of parser events, adjacent ones of one kind merged. `call_ids` (index -> id) is
    filled as calls start."""
    return [d for d, _ in delta_ends(events, limit, call_ids)]


def delta_ends(events: list[Event], limit: int, call_ids: dict[int, str]) -> list[tuple[dict[str, Any], int]]:
    """`event_deltas` with, for each, where its text ends in the output (the parser's `end` of its last event)."""
    out: list[dict[str, Any]] = []
    ends: list[int] = []
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            delta: dict[str, Any] = {"reasoning_content": ev.text, "reasoning": ev.text}
        elif isinstance(ev, ContentDelta):
            delta = {"content": ev.text}
        elif isinstance(ev, ToolCallStarted) and ev.index < limit:
            call_ids[ev.index] = new_call_id()
            delta = {"tool_calls": [{"index": ev.index, "id": call_ids[ev.index], "type": "function",
                                     "function": {"name": ev.name, "arguments": ""}}]}
        elif isinstance(ev, ToolArgumentsDelta) and ev.index < limit:
            delta = {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}
        else:
            continue
        if out and _merge(out[-1], delta):
            ends[-1] = ev.end
            continue
        out.append(delta)
        ends.append(ev.end)
    return list(zip(out, ends, strict=True))


def _merge(prev: dict[str, Any], new: dict[str, Any]) -> bool:
    if prev.keys() != new.keys():
        return False
    if "tool_calls" in new:
        a, b = prev["tool_calls"][-1], new["tool_calls"][0]
        if a["index"] != b["index"] or "id" in b:
            return False
        a["function"]["arguments"] += b["function"]["arguments"]
        return True
    for key in new:
        prev[key] += new[key]
    return True


class ChunkStream:
    def __init__(self, plan: Plan, model: str, response_id: str, write: Write, include_usage: bool,
                 tokenizer: Any = None) -> None:
        self.plan, self.model, self.id, self.write, self.tokenizer = plan, model, response_id, write, tokenizer
        self.include_usage = include_usage
        self.created = int(time.time())
        self.call_ids: dict[int, dict[int, str]] = {i: {} for i in range(plan.n)}
        self.choices: list[Choice] = []
        self.pending: dict[int, list[TokenLogprob]] = {i: [] for i in range(plan.n)}  # entries for the next delta
        self.sent: dict[int, int] = {i: 0 for i in range(plan.n)}  # entries sent per choice

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": "deepseek-mcp", "choices": choices}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(json.dumps(body, ensure_ascii=False))

    async def begin(self) -> None:
        for i in range(self.plan.n):
            await self.write(self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None, "logprobs": None}]))

    async def on_item(self, index: int, item: Item | Choice) -> None:
        if isinstance(item, Choice):
            self.choices.append(item)
            rest = (item.logprobs or [])[self.sent[index]:]  # what no delta carried yet (see logprobs.py)
            await self.write(self.chunk([{"index": index, "delta": {}, "finish_reason": finish_reason(item),
                                          "logprobs": self._logprobs(rest)}]))
            return
        _, events, entries = item
        pending = self.pending[index]
        pending += entries
        deltas = delta_ends(events, call_limit(self.plan), self.call_ids[index])
        for k, (delta, end) in enumerate(deltas):
            # a delta carries the entries of the tokens whose text ends within it; the batch's last one all
            # that this parser step resolved (up to a marker after its text)
            last = k == len(deltas) - 1
            n = len(pending) if last else next((j for j, e in enumerate(pending) if e.end > end), len(pending))
            carried, pending[:] = pending[:n], pending[n:]
            self.sent[index] += n
            await self.write(self.chunk([{"index": index, "delta": delta, "finish_reason": None,
                                          "logprobs": self._logprobs(carried)}]))

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.plan.logprobs is None or not entries:
            return None
        return chat_logprobs(entries, self.tokenizer)

    async def end(self) -> None:
        if self.include_usage:
            ordered = sorted(self.choices, key=lambda c: c.index)
            await self.write(self.chunk([], usage=usage(ordered)))
        await self.write(b"data: [DONE]\n\n")
