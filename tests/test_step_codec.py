"""Block tables broadcast as deltas (inference/engine/step_codec.py): what a worker rebuilds equals rank 0's step
every time, its lists keep their identity while a sequence lives, and a decode step's payload does not grow with
the context."""

from __future__ import annotations

import random

import pytest
import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.step_codec import StepDecoder, StepEncoder
from deepseek_mcp.inference.engine.step_inputs import StepInputs


def _same(got: list[ScheduledSeq], want: list[ScheduledSeq]) -> None:
    assert [(list(s.token_ids), s.start_pos, list(s.block_table), s.num_logits) for s in got] == \
        [(list(s.token_ids), s.start_pos, list(s.block_table), s.num_logits) for s in want]


def test_random_schedule_round_trips_and_keeps_worker_lists():
    """Sequences admitted, growing a block at a time, preempted (a new list), shrunk in place, finished; a small
    capacity forces evictions. The worker's rebuilt tables feed a StepInputs that must equal rank 0's."""
    rng = random.Random(0)
    block_size, num_blocks = 4, 10_000
    enc, dec = StepEncoder(num_blocks, block_size, capacity=6), StepDecoder()
    ours, theirs = StepInputs(num_blocks, block_size, "cpu"), StepInputs(num_blocks, block_size, "cpu")
    live: dict[int, tuple[list[int], int]] = {}  # seq id -> (its live block list, tokens so far)
    for step in range(300):
        if len(live) < 8 and rng.random() < 0.3:
            sid = step
            n = rng.randint(1, 12)
            live[sid] = ([rng.randrange(num_blocks) for _ in range(-(-n // block_size))], n)
        if live and rng.random() < 0.1:
            live.pop(rng.choice(list(live)))
        if live and rng.random() < 0.05:  # preempted and re-admitted: a new list
            sid = rng.choice(list(live))
            table, n = live[sid]
            live[sid] = (list(table), n)
        if not live:
            continue
        seqs = []
        for sid, (table, n) in sorted(live.items()):
            if rng.random() < 0.5:
                continue
            k = 1 + (rng.random() < 0.2) * rng.randrange(4)  # a verified speculation: 1 + drafts, all logits
            while len(table) * block_size < n + k:
                table.append(rng.randrange(num_blocks))
            seqs.append(ScheduledSeq([rng.randrange(100) for _ in range(k)], n, table, num_logits=k))
            live[sid] = (table, n + k)
        if not seqs:
            continue
        got = dec.decode(enc.encode(seqs), len(seqs))
        _same(got, seqs)
        a, b = ours.build(seqs), theirs.build(got)
        for x, y in zip(a[:2], b[:2]):
            assert torch.equal(x, y)
        assert torch.equal(a[2].slot_mapping, b[2].slot_mapping)
        assert torch.equal(a[2].logits_indices, b[2].logits_indices)
        assert a[2].logits_indices.numel() == sum(q.num_logits for q in seqs)
        assert a[2].seq_lens_list == b[2].seq_lens_list  # a row per sequence, or per token verifying drafts
        for r, end in enumerate(a[2].seq_lens_list):  # past a row's length the tables hold stale entries
            n = -(-end // block_size)
            assert torch.equal(a[2].block_tables[r, :n], b[2].block_tables[r, :n])
    assert len(dec) <= 6 + 8  # the worker forgets what rank 0 dropped


def test_decode_payload_is_flat_in_context():
    enc, dec = StepEncoder(1 << 20, 16), StepDecoder()
    tables = [list(range(i * 8192, (i + 1) * 8192)) for i in range(4)]  # 4 sequences of 128K tokens
    first = enc.encode([ScheduledSeq([1], 16 * 8192 - 1, t) for t in tables])
    worker_lists = [s.block_table for s in dec.decode(first, 4)]
    assert first.numel() == 1 + 6 * 4 + 4 + 4 * 8192  # the whole tables, once
    step = enc.encode([ScheduledSeq([2], 16 * 8192 - 1, t) for t in tables])
    assert step.numel() == 1 + 6 * 4 + 4  # nothing new: a handful of integers per sequence
    tables[0].append(1 << 19)
    step = enc.encode([ScheduledSeq([3], 16 * 8192 if i == 0 else 16 * 8192 - 1, t) for i, t in enumerate(tables)])
    assert step.numel() == 1 + 6 * 4 + 4 + 1  # one sequence crossed a block boundary
    got = dec.decode(step, 4)
    assert got[0].block_table[-1] == 1 << 19
    assert all(s.block_table is w for s, w in zip(got, worker_lists))  # extended in place: StepInputs' rows stay


def test_shrunk_list_is_resent_and_a_bad_step_records_nothing():
    enc, dec = StepEncoder(100, 4), StepDecoder()
    table = [1, 2, 3]
    got = dec.decode(enc.encode([ScheduledSeq([0], 8, table)]), 1)
    worker_list = got[0].block_table
    del table[1:]
    got = dec.decode(enc.encode([ScheduledSeq([0], 3, table)]), 1)
    assert got[0].block_table == [1] and got[0].block_table is not worker_list  # a fresh row on the worker
    table.append(100)  # outside the pool
    with pytest.raises(ValueError, match="block id 100 outside the pool of 100 blocks"):
        enc.encode([ScheduledSeq([0], 4, table)])
    table[-1] = 7
    got = dec.decode(enc.encode([ScheduledSeq([0], 4, table)]), 1)  # the refused step left both sides in sync
    assert got[0].block_table == [1, 7]
    with pytest.raises(ValueError, match="cannot hold"):
        enc.encode([ScheduledSeq([0, 1], 7, table)])
    with pytest.raises(ValueError, match="no new tokens"):
        enc.encode([ScheduledSeq([], 0, table)])
    with pytest.raises(ValueError, match="at least one sequence"):
        enc.encode([])


def test_out_of_sync_worker_fails_loudly():
    enc = StepEncoder(100, 4)
    table = [1]
    StepDecoder().decode(enc.encode([ScheduledSeq([0], 0, table)]), 1)
    table.append(2)
    with pytest.raises(RuntimeError, match="out of sync"):
        StepDecoder().decode(enc.encode([ScheduledSeq([0], 4, table)]), 1)  # a worker that missed the first step
