"""What one forward step needs to know about the sequences in its batch and where their cache lives (the
model's `AttentionMetadata`, built here from the scheduled sequences)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepseek_mcp.inference.model.attention import AttentionMetadata


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: the new tokens to compute and the blocks that hold its cache."""

    token_ids: Sequence[int]  # new tokens this step
    start_pos: int  # tokens of this sequence already in the cache
    # block ids covering start_pos + len(token_ids) tokens: the sequence's live list, append-only while it lives
    # (the runner mirrors it into its device table by identity, writing only new entries)
    block_table: Sequence[int]
    num_logits: int = 1  # logits of the last this many new tokens (1 + drafts when verifying a speculation)


def build_batch(
    seqs: Sequence[ScheduledSeq], block_size: int, device: torch.device, all_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flatten scheduled sequences into (input_ids [T], positions [T], metadata)."""
    if not seqs:
        raise ValueError("build_batch needs at least one sequence")
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    query_lens: list[int] = []
    logits_rows: list[int] = []
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        if n == 0:
            raise ValueError(f"sequence {i} has no new tokens to compute")
        end = s.start_pos + n
        if len(s.block_table) * block_size < end:
            raise ValueError(f"sequence {i}: block table of {len(s.block_table)} blocks x {block_size} tokens "
                             f"cannot hold {end} tokens")
        ids.extend(s.token_ids)
        for p in range(s.start_pos, end):
            positions.append(p)
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
        if not 1 <= s.num_logits <= n:
            raise ValueError(f"sequence {i}: logits of {s.num_logits} tokens asked of {n} new tokens")
        logits_rows.extend(range(len(ids) - (n if all_logits else s.num_logits), len(ids)))
        seq_lens.append(end)
        query_lens.append(n)
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = torch.tensor(list(s.block_table), dtype=torch.int32)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=device),
        block_size=block_size,
        seq_lens_list=tuple(seq_lens),
        query_lens_list=tuple(query_lens),
        max_seq_len=max(seq_lens),
    )
    input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    return input_ids, pos, meta
