"""Kernels warm at load: every Triton kernel compiled (and autotuned) for the shapes the server will run, before
"ready", so no request pays a compile (with a 50 s wall limit the first calls on a GPU would time out).

The shapes a step can take are bounded by the engine's limits: decode batches pad to `decode_buckets`
(CUDA graphs) or key the autotuners by the same powers of two; prefill and mixed steps key them by the
power-of-two bucket of their token count (`token_buckets`); the MLA split count takes one of 7 values
(`kernels.mla_triton.num_splits_for`), reached by the longest context of a decode batch. The warm-up runs one
step of each on block 0 of the pool (nothing is served yet: whatever it writes there is overwritten by the
first request that owns the block). Triton's cache dir (kernels and autotune results) lives under the
project's cache, so a restart compiles and tunes nothing (`kernels.platform.use_user_cache`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from deepseek_mcp.inference.engine.batch import ScheduledSeq


def _pow2_upto(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes a decode step is padded to: 1, 2, 4, ..., and max_num_seqs itself (16 -> 1, 2, 4, 8, 16;
    24 -> 1, 2, 4, 8, 16, 24)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    return tuple(_pow2_upto(max_num_seqs))


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `batch` sequences, None past the largest (that step runs eagerly)."""
    return next((b for b in buckets if b >= batch), None)


def token_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """Token counts that stand for every prefill / mixed step: the autotuners key on next_pow2(T), and Triton
    specializes integer arguments on == 1 and % 16 == 0, which powers of two cover."""
    return tuple(_pow2_upto(max(1, max_num_batched_tokens)))


def split_contexts(batch: int, heads: int, max_context: int, sms: int) -> list[int]:
    """One context length per MLA split count a decode batch of `batch` can reach (the longest first)."""
    from deepseek_mcp.kernels.mla_triton import num_splits_for

    seen: dict[int, int] = {}
    length = max_context
    while length >= 1:
        seen.setdefault(num_splits_for(batch, heads, length, sms), length)
        length //= 2
    return sorted(seen.values(), reverse=True)


def _seq(tokens: int, start: int, block_size: int) -> ScheduledSeq:
    """`tokens` new tokens after `start` cached ones, every position in block 0 (a table may repeat a block)."""
    return ScheduledSeq([0] * tokens, start, [0] * -(-(start + tokens) // block_size))


def warm_steps(*, max_num_seqs: int, max_num_batched_tokens: int, max_context: int, block_size: int, heads: int,
               sms: int, decode: bool = True) -> list[tuple[str, list[ScheduledSeq]]]:
    """(label, sequences) of every step shape to run once: decode per bucket and split count (unless
    `decode` is False: CUDA graphs replay decode at one split count per bucket, and capturing warms that),
    prefill and mixed (one decode row + one chunk, the absorbed kernel) per token bucket."""
    steps: list[tuple[str, list[ScheduledSeq]]] = []
    for b in decode_buckets(max_num_seqs) if decode else ():
        for ctx in split_contexts(b, heads, max_context, sms):  # only the longest row sets the split count
            steps.append((f"decode batch {b} context {ctx}",
                          [_seq(1, ctx - 1, block_size)] + [_seq(1, 0, block_size) for _ in range(b - 1)]))
    for t in token_buckets(min(max_num_batched_tokens, max_context)):
        steps.append((f"prefill {t} tokens", [_seq(t, 0, block_size)]))
        if t > 2:
            steps.append((f"mixed {t} tokens", [_seq(1, 0, block_size), _seq(t - 1, 0, block_size)]))
    return steps


def warm_up(run: Callable[[list[ScheduledSeq]], Any], steps: list[tuple[str, list[ScheduledSeq]]],
            log: Callable[[str], None] | None = None) -> float:
    """Run each step once (compiles and tunes what it launches), progress on `log` (stderr); -> seconds."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    for i, (label, seqs) in enumerate(steps, start=1):
        log(f"warming kernels {i}/{len(steps)}: {label}")
        run(seqs)
    seconds = time.perf_counter() - t0
    log(f"kernels warm: {len(steps)} step shapes in {seconds:.1f} s")
    return seconds
