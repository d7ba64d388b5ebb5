"""A step's inputs as rank 0 broadcasts them to the other tensor-parallel ranks: block tables sent as deltas.

Every sequence's block list lives on rank 0 (the scheduler's live list, append-only while the sequence lives; a
preempted or re-admitted sequence gets a new list). `StepEncoder` gives each list a handle the first time it
appears and from then on sends only the blocks added since it last sent that list, so a decode step costs a few
integers per sequence whatever the context length (only the sequences that crossed a block boundary add one).
`StepDecoder`, on each worker, keeps one live list per handle and extends it in place, so the worker's
`StepInputs` finds the same list object every step and writes only the new entries, as on rank 0.

Payload, int64: `[D, dropped handles (D), then per sequence (new tokens, start, handle, blocks, sent, logits),
the token ids, then the new blocks of each sequence]`, where `sent` is how many leading blocks the worker already holds
(0: a new or reset list) and `blocks - sent` follow. Handles unused for a while are dropped (LRU past `capacity`
lists), and the drop travels in the next payload. Block ids are checked before anything is sent or recorded, so
a refused step leaves both sides as they were.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq


@dataclass
class _Sent:
    table: Sequence[int]  # rank 0's live list (held, so its id() stays unique while the handle lives)
    handle: int
    sent: int  # leading blocks the workers hold


class StepEncoder:
    """Rank 0's side: one per cache pool."""

    def __init__(self, num_blocks: int, block_size: int, capacity: int = 1024):
        self.num_blocks, self.block_size, self.capacity = num_blocks, block_size, capacity
        self._lists: OrderedDict[int, _Sent] = OrderedDict()  # id(list) -> what the workers hold, LRU first
        self._next_handle = 0
        self._dropped: list[int] = []

    def _held(self, table: Sequence[int]) -> _Sent | None:
        """What the workers hold of this live list, None when they must get it whole."""
        entry = self._lists.get(id(table))
        if entry is None or entry.table is not table or len(table) < entry.sent:
            return None
        return entry

    def _check(self, seqs: Sequence[ScheduledSeq]) -> None:
        """What `StepInputs.build` would refuse, checked on the blocks not yet sent (the rest were checked then)."""
        if not seqs:
            raise ValueError("build_batch needs at least one sequence")
        for i, s in enumerate(seqs):
            if not s.token_ids:
                raise ValueError(f"sequence {i} has no new tokens to compute")
            n = len(s.block_table)
            if n * self.block_size < s.start_pos + len(s.token_ids):
                raise ValueError(f"sequence {i}: block table of {n} blocks x {self.block_size} tokens "
                                 f"cannot hold {s.start_pos + len(s.token_ids)} tokens")
            entry = self._held(s.block_table)
            for b in s.block_table[0 if entry is None else entry.sent:]:
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"block id {b} outside the pool of {self.num_blocks} blocks")

    def encode(self, seqs: Sequence[ScheduledSeq]) -> torch.Tensor:
        """The step's payload (see the module docstring); raises ValueError, recording nothing, on a bad step."""
        self._check(seqs)
        heads: list[int] = []
        tokens: list[int] = []
        blocks: list[int] = []
        in_step: set[int] = set()
        for s in seqs:
            key, n = id(s.block_table), len(s.block_table)
            entry = self._held(s.block_table)
            if entry is None:  # new, a dead list's id reused, or shrunk in place: a new handle, sent whole
                if key in self._lists:
                    self._dropped.append(self._lists[key].handle)
                entry = _Sent(s.block_table, self._next_handle, 0)
                self._next_handle += 1
                self._lists[key] = entry
            self._lists.move_to_end(key)
            in_step.add(key)
            heads += [len(s.token_ids), s.start_pos, entry.handle, n, entry.sent, s.num_logits]
            tokens += s.token_ids
            blocks += s.block_table[entry.sent : n]
            entry.sent = n
        while len(self._lists) > self.capacity:  # forget the least recently used lists not in this step
            key = next((k for k in self._lists if k not in in_step), None)
            if key is None:
                break
            self._dropped.append(self._lists.pop(key).handle)
        dropped, self._dropped = self._dropped, []
        return torch.tensor([len(dropped), *dropped, *heads, *tokens, *blocks], dtype=torch.int64)


class StepDecoder:
    """A worker's side: one per cache pool."""

    def __init__(self) -> None:
        self._lists: dict[int, list[int]] = {}  # handle -> the live list this worker's StepInputs mirrors

    def decode(self, payload: torch.Tensor, num_seqs: int) -> list[ScheduledSeq]:
        values = payload.tolist()
        d = values[0]
        for h in values[1 : 1 + d]:
            self._lists.pop(h, None)
        w = 6  # header words per sequence
        head = values[1 + d : 1 + d + w * num_seqs]
        rest = values[1 + d + w * num_seqs :]
        n_tokens = sum(head[0::w])
        tokens, blocks = rest[:n_tokens], rest[n_tokens:]
        seqs, t, b = [], 0, 0
        for i in range(num_seqs):
            n, start, handle, total, sent, num_logits = head[w * i : w * i + w]
            table = self._lists.get(handle) if sent else None
            if table is None:
                table = self._lists[handle] = []  # a new object: StepInputs gives it a fresh row
            if len(table) != sent:
                raise RuntimeError(f"tensor-parallel step out of sync: handle {handle} holds {len(table)} "
                                   f"blocks here, rank 0 sent from block {sent}")
            table.extend(blocks[b : b + total - sent])
            seqs.append(ScheduledSeq(tokens[t : t + n], start, table, num_logits))
            t, b = t + n, b + total - sent
        return seqs

    def __len__(self) -> int:
        return len(self._lists)
