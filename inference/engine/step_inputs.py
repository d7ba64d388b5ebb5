"""A step's device inputs, built with host work that grows with the number of sequences, not their lengths.

`StepInputs` keeps a persistent block table on the device `[rows, max_blocks]` mirroring each sequence's block
list. A row is found by the identity of the list object (the scheduler hands over the sequence's live list, which
only grows while it lives; a preempted or re-admitted sequence gets a new list, hence a fresh row), and only the
entries added since the last step are written: a decode step writes a block for the few sequences that crossed
a block boundary. Everything a step needs (token ids, positions, slots, lengths, logits rows, the new
block-table entries) is packed into one host buffer (pinned on CUDA) and copied to the device once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.model.attention import AttentionMetadata


@dataclass
class _Row:
    table: Sequence[int]  # the sequence's live block list (held, so its id() stays unique)
    row: int
    synced: int  # leading entries already in the device table


class StepInputs:
    def __init__(self, num_blocks: int, block_size: int, device: torch.device, rows: int = 8, cols: int = 64):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self.host_table = torch.zeros(rows, cols, dtype=torch.int64)  # host mirror (slot math for prefill)
        self.table = torch.zeros(rows, cols, dtype=torch.int32, device=self.device)  # [rows, max_blocks]
        self._rows: OrderedDict[int, _Row] = OrderedDict()  # id(block list) -> row, least recently used first
        self._free = list(range(rows - 1, -1, -1))

    # ---- block table ------------------------------------------------------------------------------------
    def _grow(self, rows: int, cols: int) -> None:
        old_r, old_c = self.table.shape
        rows, cols = max(rows, old_r), max(cols, old_c)
        host = torch.zeros(rows, cols, dtype=torch.int64)
        host[:old_r, :old_c] = self.host_table
        table = torch.zeros(rows, cols, dtype=torch.int32, device=self.device)
        table[:old_r, :old_c] = self.table
        self.host_table, self.table = host, table
        self._free = list(range(rows - 1, old_r - 1, -1)) + self._free

    def _row_for(self, table: Sequence[int], in_step: set[int]) -> _Row:
        entry = self._rows.get(id(table))
        if entry is not None and entry.table is table:
            self._rows.move_to_end(id(table))
            return entry
        if entry is not None:  # a dead list's id was reused: forget it
            self._free.append(self._rows.pop(id(table)).row)
        if not self._free:  # evict the least recently used row not in this step, else grow
            victim = next((k for k, e in self._rows.items() if e.row not in in_step), None)
            if victim is None:
                self._grow(2 * self.table.shape[0], 0)
            else:
                self._free.append(self._rows.pop(victim).row)
        entry = _Row(table, self._free.pop(), 0)
        self._rows[id(table)] = entry
        return entry

    def _sync_rows(self, seqs: Sequence[ScheduledSeq]) -> tuple[list[int], list[int]]:
        """Rows of the step's sequences, and the new entries as flat (row, col, block) triples."""
        rows: list[int] = []
        changes: list[int] = []
        in_step: set[int] = set()
        for i, s in enumerate(seqs):
            entry = self._row_for(s.block_table, in_step)
            in_step.add(entry.row)
            n = len(s.block_table)
            if n < entry.synced:  # shrunk in place: rewrite it
                entry.synced = 0
            if n > self.table.shape[1]:
                self._grow(0, max(n, 2 * self.table.shape[1]))
            if n > entry.synced:
                new = list(s.block_table[entry.synced : n])
                if min(new) < 0 or max(new) >= self.num_blocks:
                    bad = next(b for b in new if not 0 <= b < self.num_blocks)
                    raise ValueError(f"sequence {i}: block id {bad} outside the pool of {self.num_blocks} blocks")
                self.host_table[entry.row, entry.synced : n] = torch.tensor(new)
                for j, b in enumerate(new, start=entry.synced):
                    changes += (entry.row, j, b)
                entry.synced = n
            rows.append(entry.row)
        return rows, changes

    # ---- one step -----------------------------------------------------------------------------------
    def build(self, seqs: Sequence[ScheduledSeq], all_logits: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten scheduled sequences into (input_ids [T], positions [T], metadata), like `build_batch`."""
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        bs = self.block_size
        rows, changes = self._sync_rows(seqs)
        query_lens = [len(s.token_ids) for s in seqs]
        seq_lens = [s.start_pos + n for s, n in zip(seqs, query_lens)]
        for i, (s, n, end) in enumerate(zip(seqs, query_lens, seq_lens)):
            if n == 0:
                raise ValueError(f"sequence {i} has no new tokens to compute")
            if not 1 <= s.num_logits <= n:
                raise ValueError(f"sequence {i}: logits of {s.num_logits} tokens asked of {n} new tokens")
            if len(s.block_table) * bs < end:
                raise ValueError(f"sequence {i}: block table of {len(s.block_table)} blocks x {bs} tokens "
                                 f"cannot hold {end} tokens")
        num_tokens, bsz = sum(query_lens), len(seqs)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        if num_tokens == bsz:  # decode: one token per sequence, all host arithmetic O(B)
            ids = [s.token_ids[0] for s in seqs]
            starts = [s.start_pos for s in seqs]
            pos = torch.tensor(starts, dtype=torch.int64)
            slots = torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, starts)])
        else:
            ids = [t for s in seqs for t in s.token_ids]
            row_of = torch.tensor(rows).repeat_interleave(torch.tensor(query_lens))  # [T]
            starts = torch.tensor([s.start_pos - q for s, q in zip(seqs, qsl)]).repeat_interleave(
                torch.tensor(query_lens))
            pos = torch.arange(num_tokens) + starts  # [T]
            slots = self.host_table[row_of, pos // bs] * bs + pos % bs  # [T]
        if all_logits:
            logits_rows = list(range(num_tokens))
        else:  # the last num_logits new tokens of each sequence (1, or 1 + drafts being verified)
            logits_rows = [r for s, end in zip(seqs, qsl[1:]) for r in range(end - s.num_logits, end)]
        if num_tokens > bsz and not all_logits and all(s.num_logits == n for s, n in zip(seqs, query_lens)):
            # decodes verifying drafts, nothing else: run as a decode of one row per token, token j of a sequence
            # seeing its first start_pos + j + 1 positions, so each position is computed as plain decoding would
            # compute it (the absorbed form, not the prefill's naive form: in bf16 their roundings differ and
            # could flip a near-tied greedy token)
            rows = [r for r, n in zip(rows, query_lens) for _ in range(n)]
            seq_lens = [s.start_pos + j + 1 for s, n in zip(seqs, query_lens) for j in range(n)]
            query_lens, bsz = [1] * num_tokens, num_tokens
            qsl = list(range(num_tokens + 1))
        # every section starts on 16 bytes (an even int64 offset): Triton specializes pointers on that alignment,
        # so an odd token count would otherwise compile a second variant of the kernels that read them
        sizes = (num_tokens, num_tokens, num_tokens, bsz, bsz + 1, len(logits_rows), bsz, len(changes))
        pad = [torch.zeros(n % 2, dtype=torch.int64) for n in sizes[:3]]
        tail = [*seq_lens, *[0] * (bsz % 2), *qsl, *[0] * ((bsz + 1) % 2), *logits_rows,
                *[0] * (len(logits_rows) % 2), *rows, *[0] * (bsz % 2), *changes]
        packed = torch.cat((torch.tensor(ids, dtype=torch.int64), pad[0], pos, pad[1], slots, pad[2],
                            torch.tensor(tail, dtype=torch.int64)))
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        dev = packed.to(self.device, non_blocking=True)
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n + n % 2)
        sec = [dev[a : a + n] for a, n in zip(starts, sizes)]  # ids, pos, slots, seq_lens, qsl, logits, rows, changes
        if changes:
            tri = sec[7].view(-1, 3)
            self.table[tri[:, 0], tri[:, 1]] = tri[:, 2].to(torch.int32)
        max_seq_len = max(seq_lens)
        width = -(-max_seq_len // bs)
        if rows == list(range(rows[0], rows[0] + bsz)):
            tables = self.table[rows[0] : rows[0] + bsz, :width]  # rows in batch order: a view, nothing copied
        else:
            tables = self.table.index_select(0, sec[6])[:, :width]
        meta = AttentionMetadata(
            slot_mapping=sec[2], block_tables=tables, seq_lens=sec[3],
            query_start_loc=sec[4], logits_indices=sec[5], block_size=bs,
            seq_lens_list=tuple(seq_lens), query_lens_list=tuple(query_lens), max_seq_len=max_seq_len)
        return sec[0], sec[1], meta
