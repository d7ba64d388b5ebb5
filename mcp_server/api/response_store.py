"""Stored responses (`store`, default true): what GET /v1/responses/{id}, its input_items and a continuation
(`previous_response_id`) read. Kept in the server's conversation store (conversations.py), under the same
limits as the MCP conversations (`limits.max_conversations` entries, `limits.max_conversation_tokens` tokens
together; least recently used evicted first), in a store of their own. An entry is immutable (JSON text), so a
continuation reads a snapshot: two requests continuing one response each make their own branch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deepseek_mcp.mcp_server.api.errors import ApiError, invalid
from deepseek_mcp.mcp_server.config import Limits
from deepseek_mcp.mcp_server.conversations import ConversationStore, UnknownConversation


@dataclass(frozen=True)
class StoredResponse:
    id: str
    num_tokens: int  # the rendered conversation through this response's output: what it costs to keep
    history_json: str  # template messages through this response's output (its instructions excluded)
    input_json: str  # this request's input items, with ids
    response_json: str  # the Response object

    @property
    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.history_json)

    @property
    def response(self) -> dict[str, Any]:
        return json.loads(self.response_json)

    @property
    def input_items(self) -> list[dict[str, Any]]:
        return json.loads(self.input_json)


class ResponseStore:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._store: ConversationStore[StoredResponse] = ConversationStore(
            limits.max_conversations, limits.max_conversation_tokens, copy=lambda r: r)

    def __len__(self) -> int:
        return len(self._store)

    def put(self, entry: StoredResponse) -> None:
        self._store.put(entry)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """Raises a 404 in the OpenAI shape naming the id (and `param` when a request field named it)."""
        try:
            return self._store.get(response_id)
        except UnknownConversation:
            raise self.not_found(response_id, param) from None

    def delete(self, response_id: str) -> None:
        try:
            self._store.remove(response_id)
        except UnknownConversation:
            raise self.not_found(response_id) from None

    def not_found(self, response_id: str, param: str | None = None) -> ApiError:
        where = f"{param} " if param else ""
        return ApiError(404, f"{where}{response_id!r} was not found: no response with that id is stored here (it "
                             "was never stored (store: false), was deleted, or was evicted; the server keeps the "
                             f"{self.limits.max_conversations} most recently used responses within "
                             f"{self.limits.max_conversation_tokens} tokens, limits.max_conversations / "
                             "limits.max_conversation_tokens)", param=param, code="response_not_found")


def input_items_page(items: list[dict[str, Any]], *, order: str, limit: int, after: str | None) -> dict[str, Any]:
    """GET /v1/responses/{id}/input_items: a cursor page (`order` asc | desc, `limit` 1-100, `after` an id)."""
    if order not in ("asc", "desc"):
        raise invalid("order must be 'asc' or 'desc'", "order")
    if not 1 <= limit <= 100:
        raise invalid("limit must be between 1 and 100", "limit")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise invalid(f"after: no input item {after!r} in this response", "after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
