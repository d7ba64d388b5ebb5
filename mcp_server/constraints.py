"""Grammar-constrained decoding for the tools (inference/constrained/ on xgrammar), per request.

`tool_call` with tool_choice "required" or {name}: the output is a tool-call block whose calls name an offered
tool and whose arguments match its schema; "auto": free text until the model opens a block, then the same;
"none": the tool-call tokens (and their spelled-out text) never appear. `chat` / `think` with `response_format`:
the reply (after the reasoning) is JSON matching the schema. Near the end of max_tokens the processors steer
toward the shortest valid completion, so an output cut by the token budget is still complete; the wall-time limit
can still cut one.

One `ConstraintFactory` per (tokenizer, vocab size), built on first use (~0.5 s for the 129k vocabulary); it
keeps an LRU of compiled grammars, so a repeated tool set or schema compiles once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from deepseek_mcp.mcp_server.tool_specs import ToolChoice, ToolSpec


def grammar_available() -> bool:
    """xgrammar installs on Linux and macOS; elsewhere the server runs unconstrained and says so."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class GrammarConstraints:
    """Builds the constrained-decoding processors of one request. Thread-safe; call it off the event loop
    (the first call builds the vocabulary, a new schema compiles)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._factories: dict[tuple[int, int | None], Any] = {}

    def factory(self, tokenizer: Any, vocab_size: int | None) -> Any:
        from deepseek_mcp.inference.constrained.factory import ConstraintFactory

        key = (id(tokenizer), vocab_size)
        with self._lock:
            made = self._factories.get(key)
            if made is None or made[0] is not tokenizer:
                made = (tokenizer, ConstraintFactory(tokenizer, vocab_size=vocab_size))
                self._factories[key] = made
            return made[1]

    def __call__(self, *, tokenizer: Any, tools: Sequence[ToolSpec], choice: ToolChoice, max_tokens: int,
                 vocab_size: int | None = None, parallel_tool_calls: bool = True,
                 thinking: bool = False) -> list[Any]:
        """Processors for `tool_call` (the ToolCallProcessors hook). Raises ConstraintError for a schema the
        grammar engine cannot express or a max_tokens below the shortest valid call. `parallel_tool_calls`
        False: at most one call; `thinking`: the calls come after `</think>`."""
        tool_choice: Any = {"name": choice.name} if choice.name is not None else choice.mode
        factory = self.factory(tokenizer, vocab_size)
        return [factory.for_tools(list(tools), tool_choice, max_tokens,
                                  parallel_tool_calls=parallel_tool_calls, thinking=thinking)]

    def response_format(self, *, tokenizer: Any, response_format: Mapping[str, Any], max_tokens: int,
                        vocab_size: int | None = None, thinking: bool = False) -> list[Any]:
        """Processors for `chat` / `think` with a response_format (none for {"type": "text"}); `thinking`: the
        JSON starts after `</think>`, and the reasoning is closed in time for it to fit."""
        proc = self.factory(tokenizer, vocab_size).for_response_format(response_format, max_tokens,
                                                                       thinking=thinking)
        return [] if proc is None else [proc]


def steered(processors: Sequence[Any]) -> bool:
    """Did a constraint processor restrict sampling to fit the output in max_tokens?"""
    return any(bool(getattr(p, "steered", False)) for p in processors)
