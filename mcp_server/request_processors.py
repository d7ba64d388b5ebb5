"""Logits processors the tools attach to a request, and the hook through which constrained decoding plugs in.

`ToolCallProcessors` is the seam for grammar-constrained tool calls: given the offered tools, the tool_choice and
the token budget, it returns per-request processors (see inference/engine/logits_process.py). The server plugs in
mcp_server.constraints.GrammarConstraints; without one (no xgrammar on this platform, or `constrained_decoding`
off), `tool_call` parses whatever the model produced and only tool_choice "none" is enforced, by the one
tool-call ban (inference/constrained/tool_ban.py) over the control tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from deepseek_mcp.mcp_server.tool_specs import ToolChoice, ToolSpec


class ToolCallProcessors(Protocol):
    def __call__(self, *, tokenizer: Any, tools: Sequence[ToolSpec], choice: ToolChoice, max_tokens: int,
                 vocab_size: int | None = None) -> Sequence[Any]: ...


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


class LogprobRecorder:
    """Records the model's log-probabilities (raw logits, before any other processor: put it first) of each
    sampled token and the `top_n` most likely ones. Edits nothing. `entries(token_ids)`: [(token id, logprob,
    [(id, logprob), ...])] per generated token, during the run too (a streaming response reads them from the
    event loop while the engine's worker thread records: a lock guards the state, and each step's row is kept
    on the host, so reading never waits for the device)."""

    def __init__(self, top_n: int = 0) -> None:
        self.top_n = top_n
        self._lock = threading.Lock()
        self._done: dict[int, tuple[float | None, list[tuple[int, float]]]] = {}
        self._pending: tuple[int, Any, list[tuple[int, float]]] | None = None  # (step, logprobs [V], top)

    def _resolve(self, output_ids: list[int]) -> None:
        if self._pending is not None and self._pending[0] < len(output_ids):
            step, row, top = self._pending
            self._done[step] = (float(row[output_ids[step]]), top)
            self._pending = None

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        import torch

        row = torch.log_softmax(logits.float(), dim=-1).cpu()  # [V], on the host
        top: list[tuple[int, float]] = []
        if self.top_n:
            values, ids = row.topk(self.top_n)  # [n], [n]
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        with self._lock:
            self._resolve(output_ids)
            self._pending = (len(output_ids), row, top)
        return logits

    def entries(self, token_ids: list[int], start: int = 0) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        """Entries for token_ids[start:] (a token whose step was not recorded gets (None, []))."""
        with self._lock:
            self._resolve(token_ids)
            return [(t, *self._done.get(k, (None, []))) for k, t in enumerate(token_ids[start:], start)]
