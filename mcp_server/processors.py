"""Logits processors the tools attach to a request, and the hook through which constrained decoding plugs in.

`ToolCallProcessors` is the seam for grammar-constrained tool calls: given the offered tools, the tool_choice and
the token budget, it returns per-request processors (see inference/logits_process.py). The server plugs in
mcp_server.constraints.GrammarConstraints; without one (no xgrammar on this platform, or `constrained_decoding`
off), `tool_call` parses whatever the model produced and only tool_choice "none" is enforced, by banning the
tokens that open a tool-call block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from mcp_server.tool_specs import ToolChoice, ToolSpec

TOOL_CALL_OPENERS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>")


class ToolCallProcessors(Protocol):
    def __call__(self, *, tokenizer: Any, tools: Sequence[ToolSpec], choice: ToolChoice, max_tokens: int,
                 vocab_size: int | None = None) -> Sequence[Any]: ...


class BanTokens:
    """Never sample the given token ids."""

    def __init__(self, token_ids: Iterable[int]) -> None:
        self.token_ids = sorted(set(token_ids))

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        logits[self.token_ids] = float("-inf")  # logits: [V]
        return logits


def ban_tool_calls(tokenizer: Any) -> BanTokens:
    ids = [tokenizer.token_to_id(t) for t in TOOL_CALL_OPENERS]
    return BanTokens(i for i in ids if i is not None)


class Penalties:
    """OpenAI's presence and frequency penalties over the request's own output so far:
    logit[t] -= presence * (count[t] > 0) + frequency * count[t]."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0) -> None:
        self.presence, self.frequency = presence, frequency

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        if not output_ids:
            return logits
        import torch

        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)  # [U], [U]
        logits[ids] -= self.presence + self.frequency * counts.to(logits.dtype)
        return logits
