"""Server-side conversation memory: a bounded LRU map from conversation id to its messages."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


class UnknownConversation(KeyError):
    pass


@dataclass
class Conversation:
    id: str
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # renderer format, system prompt excluded


class ConversationStore:
    """Keeps the `capacity` most recently used conversations. Messages are stored as plain dicts (copied)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def new_id(self) -> str:
        return "conv_" + secrets.token_hex(12)

    def get(self, conversation_id: str) -> Conversation:
        """A snapshot copy; raises UnknownConversation."""
        with self._lock:
            conv = self._items.get(conversation_id)
            if conv is None:
                raise UnknownConversation(conversation_id)
            self._items.move_to_end(conversation_id)
            return Conversation(conv.id, conv.system, [dict(m) for m in conv.messages])

    def put(self, conv: Conversation) -> None:
        with self._lock:
            self._items[conv.id] = Conversation(conv.id, conv.system, [dict(m) for m in conv.messages])
            self._items.move_to_end(conv.id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def remove(self, conversation_id: str) -> int:
        """Forget a conversation; returns how many messages it held. Raises UnknownConversation."""
        with self._lock:
            conv = self._items.pop(conversation_id, None)
        if conv is None:
            raise UnknownConversation(conversation_id)
        return len(conv.messages)
