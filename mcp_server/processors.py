"""Logits processors the tools attach to a request, and the hook through which constrained decoding plugs in.

`ToolCallProcessors` is the seam for grammar-constrained tool calls: given the offered tools, the tool_choice and
the token budget, it returns per-request processors (see inference/logits_process.py). The server plugs in
mcp_server.constraints.GrammarConstraints; without one (no xgrammar on this platform, or `constrained_decoding`
off), `tool_call` parses whatever the model produced and only tool_choice "none" is enforced, by the one
tool-call ban (inference/constrained/tool_ban.py) over the control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from mcp_server.tool_specs import ToolChoice, ToolSpec


class ToolCallProcessors(Protocol):
    def __call__(self, *, tokenizer: Any, tools: Sequence[ToolSpec], choice: ToolChoice, max_tokens: int,
                 vocab_size: int | None = None) -> Sequence[Any]: ...
