"""Per-request logits processors, applied row by row before sampling.

A processor sees the tokens its request generated so far and that request's float32 logits row `[V]`; it
may edit the row in place and returns it. Processors are stateful objects owned by one request. A processor
may also define `prepare(output_ids)`, which the engine calls before the forward pass so expensive mask
work (e.g. a grammar matcher) overlaps the model's compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from typing import Protocol, runtime_checkable

import torch

THINK_END_ID = 128799  # "</think>" in the DeepSeek-V3.1 vocabulary


@runtime_checkable
class LogitsProcessor(Protocol):
    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor: ...


class ThinkingBudget:
    """Force `</think>` once `budget` tokens were generated without one; afterwards a no-op."""

    def __init__(self, budget: int, think_end_id: int = THINK_END_ID) -> None:
        if budget < 0:
            raise ValueError(f"thinking budget must be >= 0, got {budget}")
        self.budget = budget
        self.think_end_id = think_end_id
        self._closed = False
        self._scanned = 0  # output_ids[:_scanned] were checked for </think>

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self._closed:
            self._closed = self.think_end_id in output_ids[self._scanned :]
            self._scanned = len(output_ids)
        if self._closed or len(output_ids) < self.budget:
            return logits
        logits.fill_(float("-inf"))
        logits[self.think_end_id] = 0.0
        return logits


def has_prepare(processors: Sequence[object]) -> bool:
    return any(callable(getattr(p, "prepare", None)) for p in processors)


def prepare_all(rows: Sequence[tuple[Sequence[object], list[int]]]) -> None:
    """Call `prepare(output_ids)` on every processor that has one. rows: (processors, output_ids)."""
    for processors, output_ids in rows:
        for p in processors:
            prepare = getattr(p, "prepare", None)
            if callable(prepare):
                prepare(output_ids)


def start_prepare(
    executor: Executor | None, rows: Sequence[tuple[Sequence[object], list[int]]]
) -> Future[None] | None:
    """Run `prepare_all` on `executor` (concurrently with the forward) or inline; returns a future or None."""
    rows = [r for r in rows if has_prepare(r[0])]
    if not rows:
        return None
    if executor is None:
        prepare_all(rows)
        return None
    return executor.submit(prepare_all, rows)


def apply_logits_processors(
    logits: torch.Tensor,
    processors: Sequence[Sequence[LogitsProcessor]],
    output_ids: Sequence[list[int]],
) -> torch.Tensor:
    """Apply each row's processors in order. logits [B, V] float32 (edited in place); returns it."""
    if logits.dim() != 2 or logits.shape[0] != len(processors) or len(processors) != len(output_ids):
        raise ValueError(
            f"logits {tuple(logits.shape)} need one processor list and one output_ids per row, "
            f"got {len(processors)} and {len(output_ids)}"
        )
    for b, (procs, ids) in enumerate(zip(processors, output_ids, strict=True)):
        for proc in procs:
            row = proc(ids, logits[b])  # [V]
            if row is not None and row.data_ptr() != logits[b].data_ptr():
                logits[b] = row
    return logits
