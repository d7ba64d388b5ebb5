"""Server-side conversation memory: an LRU map from id to what is kept (the MCP tools' conversations, the
Responses API's stored responses), bounded by count and by total tokens, and the per-conversation turn locks
that keep concurrent calls on one conversation in order."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import anyio


class UnknownConversation(KeyError):
    pass


@dataclass
class Conversation:
    id: str
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # renderer format, system prompt excluded
    num_tokens: int = 0  # the rendered conversation (prompt + last reply), what it costs to keep


class Kept(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def num_tokens(self) -> int: ...


K = TypeVar("K", bound=Kept)


class ConversationStore(Generic[K]):
    """Keeps the most recently used entries: at most `capacity` of them and, together, at most `max_tokens`
    tokens (the least recently used go first; the newest is kept even when it alone is over). Entries are
    copied in and out with `copy` (conversations: their messages as plain dicts; immutable entries need none)."""

    def __init__(self, capacity: int, max_tokens: int | None = None,
                 copy: Callable[[K], K] | None = None) -> None:
        self.capacity = capacity
        self.max_tokens = max_tokens
        self._copy: Callable[[K], K] = copy or _copy  # type: ignore[assignment]
        self._items: OrderedDict[str, K] = OrderedDict()
        self._lock = threading.Lock()
        self.total_tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    def new_id(self) -> str:
        return "conv_" + secrets.token_hex(12)

    def get(self, conversation_id: str) -> K:
        """A snapshot copy; raises UnknownConversation."""
        with self._lock:
            conv = self._items.get(conversation_id)
            if conv is None:
                raise UnknownConversation(conversation_id)
            self._items.move_to_end(conversation_id)
            return self._copy(conv)

    def put(self, conv: K) -> None:
        with self._lock:
            old = self._items.pop(conv.id, None)
            if old is not None:
                self.total_tokens -= old.num_tokens
            self._items[conv.id] = self._copy(conv)
            self.total_tokens += conv.num_tokens
            while len(self._items) > 1 and (len(self._items) > self.capacity or (
                    self.max_tokens is not None and self.total_tokens > self.max_tokens)):
                _, evicted = self._items.popitem(last=False)
                self.total_tokens -= evicted.num_tokens

    def remove(self, conversation_id: str) -> int:
        """Forget an entry; returns how many messages it held (0 if it has none). Raises UnknownConversation."""
        with self._lock:
            conv = self._items.pop(conversation_id, None)
            if conv is not None:
                self.total_tokens -= conv.num_tokens
        if conv is None:
            raise UnknownConversation(conversation_id)
        return len(getattr(conv, "messages", ()))


def _copy(conv: Any) -> Any:
    return Conversation(conv.id, conv.system, [dict(m) for m in conv.messages], conv.num_tokens)


class TurnLocks:
    """One lock per conversation id, held from reading the conversation to storing the reply, so calls on one
    conversation run one after another in arrival order (anyio's Lock is FIFO) and none overwrites another's
    turn. A lock lives while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def busy(self, conversation_id: str) -> bool:
        entry = self._locks.get(conversation_id)
        return entry is not None and entry[0].locked()

    @asynccontextmanager
    async def hold(self, conversation_id: str | None) -> AsyncIterator[None]:
        if conversation_id is None:  # a new conversation: nobody else knows its id yet
            yield
            return
        lock, users = self._locks.get(conversation_id) or (anyio.Lock(), 0)
        self._locks[conversation_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[conversation_id]
            if users == 1:
                del self._locks[conversation_id]
            else:
                self._locks[conversation_id] = (lock, users - 1)
