"""The one generation step of the project: schedule, forward, logits processors, sample, stop checks.

`EngineCore` owns the block manager, the scheduler and the model runner of one cache pool. Both engines drive
it: `AsyncEngine` calls `step()` in a worker thread between admitting and aborting requests on its event loop;
the synchronous `Engine.generate` calls it in a loop until every sequence has finished.
"""

from __future__ import annotations

from collections import abc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.block_manager import BlockManager
from deepseek_mcp.inference.engine.logits_process import apply_logits_processors, has_prepare, start_prepare
from deepseek_mcp.inference.engine.mtp_drafter import MAX_SPECULATIVE_TOKENS, MTPDrafter, draft_room
from deepseek_mcp.inference.engine.runner import (
    CacheMemoryError,
    cache_bytes_per_token,
    check_cache_fits,
)
from deepseek_mcp.inference.engine.sampling import sample, to_device
from deepseek_mcp.inference.engine.scheduler import Scheduler, SchedulerOutput
from deepseek_mcp.inference.engine.sequence import Sequence, SeqUpdate
from deepseek_mcp.inference.engine.speculative import Drafter, emitted_tokens
from deepseek_mcp.inference.resources import available_memory

DEFAULT_TOKENS_PER_SEQ = 8192  # default cache size: this many tokens per concurrent sequence ...
DEFAULT_MEMORY_FRACTION = 0.5  # ... if that much of the available memory allows


class Runner(Protocol):
    num_blocks: int

    def run(self, seqs: abc.Sequence[ScheduledSeq]) -> torch.Tensor: ...


@dataclass
class StepResult:
    out: SchedulerOutput | None = None
    updates: list[SeqUpdate] = field(default_factory=list)
    error: BaseException | None = None


def plan_cache_blocks(
    engine: Any,
    *,
    block_size: int,
    cache_tokens: int | None,
    max_num_seqs: int,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> int:
    """Number of cache blocks, checked against the device's available memory before anything is allocated.

    With `cache_tokens` the pool holds that many tokens (rounded up to whole blocks) or the call fails naming
    the setting; without it, `DEFAULT_TOKENS_PER_SEQ` tokens per sequence (capped by the model's context),
    within `memory_fraction` of the available memory.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    device = torch.device(engine.device)
    mtp = getattr(engine.model, "mtp", None) is not None  # its latent cache is one more layer of the pool
    if cache_tokens is not None:
        if cache_tokens < block_size:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one block of {block_size} tokens")
        num_blocks = -(-cache_tokens // block_size)
        check_cache_fits(engine.config, num_blocks, block_size, engine.dtype, device, "cache_tokens", mtp)
        return num_blocks
    per_token = cache_bytes_per_token(engine.config, engine.dtype, mtp)
    budget_tokens = int(available_memory(device) * memory_fraction) // per_token
    want = max_num_seqs * min(engine.max_context, DEFAULT_TOKENS_PER_SEQ)
    num_blocks = min(budget_tokens, want) // block_size
    if num_blocks < 1:
        raise CacheMemoryError(
            f"not enough free memory on {device} for one cache block ({block_size * per_token} bytes); "
            "free memory or set `cache_tokens`"
        )
    return num_blocks


class EngineCore:
    def __init__(
        self,
        engine: Any,
        *,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        cache_tokens: int | None = None,
        block_size: int = 16,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
        runner: Runner | None = None,
        warm_up: bool | None = None,
        enforce_eager: bool = False,
        drafter: Drafter | None = None,
        speculative_tokens: int | None = None,
    ) -> None:
        """`engine`: an `inference.engine.engine.Engine` (config, device, dtype, max_context, make_runner).
        `runner` replaces the engine's model runner (tests); its `num_blocks` then sizes the pool.
        A runner with `warm_up` compiles its kernels for this pool's limits and captures the decode CUDA graphs
        before the first step (`warm_up` None: where that pays, the Triton path on CUDA; `enforce_eager`: no
        graphs).
        `speculative_tokens` K (None: the engine's `speculative_tokens`, as loaded): each decoding sequence
        verifies up to K drafts per step, from `drafter`, else from the model's MTP layer (mtp_drafter.py)."""
        if runner is None:
            num_blocks = plan_cache_blocks(engine, block_size=block_size, cache_tokens=cache_tokens,
                                           max_num_seqs=max_num_seqs, memory_fraction=memory_fraction)
            runner = engine.make_runner(num_blocks, block_size, "cache_tokens")
        else:
            num_blocks = int(runner.num_blocks)
        self.runner = runner
        if speculative_tokens is None:
            speculative_tokens = int(getattr(engine, "speculative_tokens", 0))
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        self.mtp: MTPDrafter | None = None
        if speculative_tokens and drafter is None:
            if not getattr(runner, "has_mtp", False):
                raise ValueError(f"speculative_tokens {speculative_tokens} needs a drafter: load the model with "
                                 "its multi-token-prediction layer (Engine.from_pretrained(speculative_tokens=K), "
                                 "`--speculative-tokens K`) or pass one")
            if speculative_tokens > MAX_SPECULATIVE_TOKENS:
                raise ValueError(f"speculative_tokens {speculative_tokens} is more than the MTP layer drafts "
                                 f"usefully; use 1..{MAX_SPECULATIVE_TOKENS}")
            self.mtp = MTPDrafter(runner)
        self.drafter = drafter if speculative_tokens else None
        self.speculative_tokens = speculative_tokens
        self.vocab_size = int(engine.config.vocab_size) if self.drafter is not None else 0  # drafts' bound
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=engine.max_context)
        self._prepare_pool: ThreadPoolExecutor | None = None
        warm = getattr(runner, "warm_up", None)
        if warm is not None and warm_up is not False:
            # a step verifying drafts is a decode of one row per token: up to 1 + K rows per sequence
            warm(max_num_seqs=max_num_seqs * (1 + self.speculative_tokens),
                 max_num_batched_tokens=max_num_batched_tokens,
                 max_context=engine.max_context, enforce_eager=enforce_eager, force=warm_up)

    def step(self) -> StepResult:
        """One model step: schedule, forward, process logits, sample, check stops. An exception in the model
        is returned in `error` (the step's requests get it; the engine goes on)."""
        result = StepResult()
        try:
            with torch.inference_mode():  # the logits are inference tensors; processors edit them in place
                self._step(result)
        except Exception as exc:  # noqa: BLE001
            result.error = exc
        return result

    def close(self) -> None:
        if self._prepare_pool is not None:
            self._prepare_pool.shutdown(wait=False)

    def _step(self, result: StepResult) -> None:
        out = self.scheduler.schedule()
        result.out = out
        if out.is_empty:
            return
        sampling = [out.seqs[r] for r in out.sample_rows]
        prep = start_prepare(self._pool_for(sampling),
                             [(s.logits_processors, s.output_ids) for s in sampling if s.logits_processors])
        if self.mtp is not None:  # every new token's state kept for the MTP layer
            logits = self.runner.run(out.scheduled, keep_hidden=True)
        else:
            logits = self.runner.run(out.scheduled)  # [sum of num_logits, V]: one row per row, 1 + drafts verifying
        if prep is not None:
            prep.result()
        first = [0]  # each row's first logits row
        for sched in out.scheduled:
            first.append(first[-1] + sched.num_logits)
        emitted: dict[int, int | list[int]] = {}
        plain = [r for r in out.sample_rows if out.scheduled[r].num_logits == 1]
        if plain:
            seqs = [out.seqs[r] for r in plain]
            rows = logits.float()  # [B, V]
            if len(plain) < len(out.seqs) or first[-1] != len(out.seqs):  # prefill chunks or drafts beside them
                rows = rows[to_device([first[r] for r in plain], logits.device, torch.long)]  # [S, V]
            if any(s.logits_processors for s in seqs):
                apply_logits_processors(rows, [s.logits_processors for s in seqs], [s.output_ids for s in seqs])
            tokens = sample(rows, [s.params for s in seqs], [s.num_output_tokens for s in seqs]).tolist()
            emitted.update(zip(plain, tokens, strict=True))
        for r in out.sample_rows:
            if out.scheduled[r].num_logits > 1:
                emitted[r] = verify(out.seqs[r], out.scheduled[r].token_ids[1:], logits[first[r] : first[r + 1]])
        result.updates = self.scheduler.postprocess(out, [emitted[r] for r in out.sample_rows])
        if self.mtp is not None:
            self.mtp.draft_step(out, self.scheduler, self.speculative_tokens)
        elif self.drafter is not None:
            self._propose()

    def _propose(self) -> None:
        """Drafts for every decoding sequence's next step: as many as `speculative_tokens`, its max_tokens and
        the model length leave room for, each a token id of the vocabulary (else none are kept)."""
        sch = self.scheduler
        for seq in sch.running:
            if seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            room = draft_room(seq, self.speculative_tokens, sch.max_model_len)
            drafts = [int(t) for t in self.drafter.propose(seq, room)] if room > 0 else []
            seq.draft_ids = drafts[:room] if all(0 <= t < self.vocab_size for t in drafts) else []

    def _pool_for(self, seqs: list[Sequence]) -> ThreadPoolExecutor | None:
        if not any(has_prepare(s.logits_processors) for s in seqs):
            return None
        if self._prepare_pool is None:
            self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logits-prepare")
        return self._prepare_pool


def verify(seq: Sequence, drafts: abc.Sequence[int], logits: torch.Tensor) -> list[int]:
    """The tokens a decoding row emits from its verified drafts: logits [1 + K, V] of the last token and each
    draft. Each position is sampled as plain decoding would (processors seeing the tokens emitted before it,
    the draw keyed by the output index), and the next one is read only while the sample equals its draft
    (speculative.py)."""
    n_out = seq.num_output_tokens
    if not seq.logits_processors:  # every position at once; one host read
        targets = sample(logits.float(), [seq.params] * len(logits), range(n_out, n_out + len(logits))).tolist()
        return emitted_tokens(drafts, targets)
    out_ids = list(seq.output_ids)
    tokens: list[int] = []
    for j in range(len(logits)):
        row = logits[j : j + 1].float()  # [1, V]
        apply_logits_processors(row, [seq.logits_processors], [out_ids])
        t = int(sample(row, [seq.params], [n_out + j])[0])
        tokens.append(t)
        out_ids.append(t)
        if j == len(drafts) or t != drafts[j]:
            break
    return tokens
