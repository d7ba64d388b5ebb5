"""Async serving engine: continuous batching of streamed requests over one model and its paged latent cache.

One background task (the loop) drives the model: between steps it admits submitted requests and applies
aborts; each step (schedule, forward, logits processors, sampling, stop checks) runs in a worker thread so
the event loop never blocks; then each request's new tokens go to its output stream.

    async with AsyncEngine(engine, max_num_seqs=16) as aeng:
        async for out in aeng.stream(prompt_ids, SamplingParams(max_tokens=64)):
            print(out.text_delta, end="")

`abort(request_id)` may be called from any thread; a consumer that stops iterating (or whose task is
cancelled) aborts its request. Either way the request's cache blocks are back in the pool before the next
step. `start()`/`aclose()` must be called from the same task (they enter and exit a task group).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from deepseek_mcp.inference.engine.block_manager import BlockManager
from deepseek_mcp.inference.engine.core import EngineCore, Runner, StepResult
from deepseek_mcp.inference.engine.logits_process import LogitsProcessor
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.scheduler import Scheduler
from deepseek_mcp.inference.engine.sequence import Sequence, SeqUpdate


@dataclass(frozen=True)
class RequestStats:
    ttft_s: float | None  # submission to first token
    tokens_per_s: float  # decode rate after the first token (0 until there are two tokens)
    elapsed_s: float  # since submission
    num_preemptions: int = 0
    num_drafted: int = 0  # speculative decoding: drafts verified, accepted, steps that verified drafts
    num_accepted: int = 0
    num_verify_steps: int = 0


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    token_ids: list[int]  # all generated so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    stats: RequestStats
    stop: int | str | None = None  # finished with "stop": the stop token id or the stop string that matched


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    cache_usage: float  # fraction of blocks referenced by live requests
    prefix_hit_rate: float  # cached / queried prompt tokens over all admitted requests
    num_blocks: int
    block_size: int
    cached_blocks: int  # full blocks indexed for reuse (in use or not)
    prefix_hit_tokens: int
    prefix_query_tokens: int
    num_preemptions: int
    num_steps: int
    generated_tokens: int
    speculative_tokens: int = 0  # drafts per decode step (0: no speculative decoding)
    draft_tokens: int = 0  # drafts verified, of them accepted, and steps of a sequence that verified drafts
    accepted_tokens: int = 0
    verify_steps: int = 0
    acceptance_rate: float = 0.0  # accepted / draft tokens


class EngineClosedError(RuntimeError):
    pass


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests already; nothing was queued. Retry later."""


@dataclass(eq=False)
class _Request:
    seq: Sequence
    send: MemoryObjectSendStream[RequestOutput | BaseException]
    submitted: bool = False
    done: bool = False
    serial: int = 0  # submission order (an abort applies to requests submitted before it)


class AsyncEngine:
    def __init__(self, engine: Any, *, max_waiting: int | None = None, **options: Any) -> None:
        """`engine`: an `inference.engine.engine.Engine` (model, config, tokenizer, device, dtype, make_runner).
        `max_waiting`: most requests that wait without a batch slot (submitted beyond `max_num_seqs`); one more
        raises QueueFullError (None: no bound). Requests the free slots will take at the next step do not count.
        `options` size the cache and the batch, as `EngineCore` takes them: `max_num_seqs`,
        `max_num_batched_tokens`, `cache_tokens`, `block_size`, `memory_fraction`, `warm_up` and `enforce_eager`
        (kernels warm and decode CUDA graphs at construction), and `runner`, which replaces the engine's model
        runner (tests; its `num_blocks` then sizes the pool)."""
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be None or >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.device = torch.device(engine.device)
        self.core = EngineCore(engine, **options)
        self._requests: dict[str, _Request] = {}  # touched by the loop's thread only
        self._inbox: list[tuple[str, Any]] = []  # ("add", _Request) | ("abort", request_id), any thread
        self._inbox_lock = threading.Lock()
        self._serial = 0
        self._wakeup: anyio.Event | None = None  # created on the loop (anyio needs a running backend)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._loop_thread: int | None = None
        self._in_step = False
        self._closing = False
        self._closed = False
        self._failure: BaseException | None = None
        self.num_steps = 0
        self.generated_tokens = 0

    @property
    def runner(self) -> Runner:
        return self.core.runner

    @property
    def block_manager(self) -> BlockManager:
        return self.core.block_manager

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task_group is not None or self._closed:
            raise RuntimeError("AsyncEngine.start() may be called once")
        self._loop_thread = threading.get_ident()
        self._wakeup = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        tg.start_soon(self._loop)

    async def aclose(self) -> None:
        """Stop the loop after the current step; every unfinished request ends with finish_reason "abort"."""
        if self._task_group is None or self._closed:
            self._closed = True
            return
        self._closing = True
        self._wake()
        tg, self._task_group = self._task_group, None
        try:
            await tg.__aexit__(None, None, None)
        finally:
            self._closed = True
            self.core.close()

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- requests -----------------------------------------------------------------------------------
    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        logits_processors: abc.Sequence[LogitsProcessor] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its outputs (one per step that produced tokens; the last one
        has `finished=True`). Bad input raises here, before anything is queued."""
        self._check_open()
        prompt_ids = [int(t) for t in prompt_ids]
        self.engine.check_prompt(prompt_ids)
        if len(prompt_ids) >= self.scheduler.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; at most {self.scheduler.max_model_len - 1} fit "
                f"(cache capacity {self.cache_capacity_tokens} tokens, set by cache_tokens)"
            )
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if self.max_waiting is not None and self.num_without_slot(1) > self.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.num_without_slot()} requests wait for one of "
                                 f"the {self.scheduler.max_num_seqs} batch slots; the bound is {self.max_waiting})")
        send, recv = anyio.create_memory_object_stream[RequestOutput | BaseException](math.inf)
        seq = Sequence(rid, prompt_ids, params, tuple(logits_processors),
                       decoder=self.tokenizer.incremental_decoder(), eos_id=self.tokenizer.eos_id)
        return self._iterate(_Request(seq, send), recv)

    async def _iterate(
        self, req: _Request, recv: MemoryObjectReceiveStream[RequestOutput | BaseException]
    ) -> AsyncIterator[RequestOutput]:
        rid = req.seq.request_id
        finished = False
        async with recv:
            try:
                self._check_open()
                if rid in self._requests:
                    raise ValueError(f"request id {rid!r} is already in use")
                self._requests[rid] = req
                req.submitted = True
                self._post(("add", req))
                async for item in recv:
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    finished = item.finished
                    yield item
                    if finished:
                        return
                raise EngineClosedError(f"the engine stopped before request {rid!r} finished")
            finally:
                if req.submitted and not finished:
                    self.abort(rid)  # consumer left early or was cancelled: free the blocks

    def abort(self, request_id: str) -> None:
        """Abort a request (any thread). Its blocks are freed now if called on the loop's thread between
        steps, else right after the running step; its stream ends with finish_reason "abort"."""
        self._post(("abort", request_id))

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting) + self._num_queued(),
            cache_usage=bm.usage, prefix_hit_rate=bm.prefix_hit_rate, num_blocks=bm.num_blocks,
            block_size=bm.block_size, cached_blocks=bm.num_cached_blocks, prefix_hit_tokens=bm.prefix_hit_tokens,
            prefix_query_tokens=bm.prefix_query_tokens, num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps, generated_tokens=self.generated_tokens,
            speculative_tokens=self.speculative_tokens, draft_tokens=self.scheduler.num_draft_tokens,
            accepted_tokens=self.scheduler.num_accepted_tokens, verify_steps=self.scheduler.num_verify_steps,
            acceptance_rate=self.scheduler.num_accepted_tokens / max(self.scheduler.num_draft_tokens, 1),
        )

    @property
    def speculative_tokens(self) -> int:
        """Drafts per decode step (0: no speculative decoding)."""
        return self.core.speculative_tokens

    @property
    def cache_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output one request can reach (model context capped by the cache)."""
        return self.scheduler.max_model_len

    # ---- the loop -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._failure is not None:
            raise EngineClosedError(f"the engine loop failed: {self._failure!r}") from self._failure
        if self._closing or self._closed or self._task_group is None:
            raise EngineClosedError("the AsyncEngine is not running (use `async with AsyncEngine(...)`)")

    def num_waiting(self) -> int:
        """Requests submitted and not finished that are not running (queued, or preempted)."""
        return max(len(self._requests) - len(self.scheduler.running), 0)

    def num_without_slot(self, more: int = 0) -> int:
        """Requests submitted and not finished (and `more` about to be) beyond the batch's slots: those no slot
        can take at the next step (what `max_waiting` bounds)."""
        return max(len(self._requests) + more - self.scheduler.max_num_seqs, 0)

    def _num_queued(self) -> int:
        with self._inbox_lock:
            return sum(1 for kind, _ in self._inbox if kind == "add")

    def _post(self, item: tuple[str, Any]) -> None:
        """Queue an add or abort for the loop. Never blocks: a loop that sleeps has no live request an abort
        could target (a queued add wakes it), and a busy loop drains the inbox before every step."""
        kind, value = item
        with self._inbox_lock:
            self._serial += 1
            if kind == "add":
                value.serial = self._serial
            else:
                item = (kind, (value, self._serial))  # aborts only what was submitted before it
            self._inbox.append(item)
        if threading.get_ident() == self._loop_thread:
            if not self._in_step and kind == "abort" and not self._closed:
                self._drain_inbox()  # between steps: free the blocks right now
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for kind, value in items:
            if kind == "add":
                req: _Request = value
                if req.done:
                    continue
                try:
                    self.scheduler.add(req.seq)
                except Exception as exc:  # noqa: BLE001  (reported to that request's consumer)
                    self._finish(req, exc)
            else:
                rid, serial = value
                req = self._requests.get(rid)
                if req is None or req.done or req.serial > serial:
                    continue
                update = self.scheduler.abort(rid)
                if update is None:  # never reached the scheduler
                    update = req.seq.finish("abort")
                self._deliver(req, update)

    async def _loop(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if self._closing:
                    break
                if not self.scheduler.has_work():
                    self._wakeup = anyio.Event()
                    with self._inbox_lock:
                        pending = bool(self._inbox)
                    if not pending and not self._closing:
                        await self._wakeup.wait()
                    self._wakeup = None
                    continue
                self._in_step = True
                try:
                    result = await anyio.to_thread.run_sync(self.core.step)
                finally:
                    self._in_step = False
                self._apply(result)
                await anyio.lowlevel.checkpoint()
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self._failure = exc
            raise
        finally:
            self._shutdown_requests()

    def _apply(self, result: StepResult) -> None:
        self.num_steps += 1
        if result.error is not None:
            failed = result.out.seqs if result.out is not None else list(self.scheduler.running)
            for seq in failed:
                self.scheduler.abort(seq.request_id)
                req = self._requests.get(seq.request_id)
                if req is not None:
                    self._finish(req, result.error)
            return
        for update in result.updates:
            self.generated_tokens += len(update.new_token_ids)
            req = self._requests.get(update.request_id)
            if req is not None:
                self._deliver(req, update)

    def _deliver(self, req: _Request, update: SeqUpdate) -> None:
        seq = req.seq
        now = time.monotonic()
        n = seq.num_output_tokens
        first, last = seq.first_token_time, seq.last_token_time
        rate = (n - 1) / (last - first) if first is not None and last is not None and n > 1 and last > first else 0.0
        stats = RequestStats(ttft_s=None if first is None else first - seq.arrival_time, tokens_per_s=rate,
                             elapsed_s=now - seq.arrival_time, num_preemptions=seq.num_preemptions,
                             num_drafted=seq.num_drafted, num_accepted=seq.num_accepted,
                             num_verify_steps=seq.num_verify_steps)
        out = RequestOutput(
            request_id=seq.request_id, new_token_ids=update.new_token_ids, text_delta=update.text_delta,
            token_ids=seq.output_ids, finished=update.finished, finish_reason=update.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=max(seq.num_cached_tokens, 0),
            stats=stats, stop=update.stop,
        )
        if update.finished:
            self._finish(req, out)
            return
        try:
            req.send.send_nowait(out)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.abort(seq.request_id)  # nobody listens any more

    def _finish(self, req: _Request, last: RequestOutput | BaseException) -> None:
        req.done = True
        self._requests.pop(req.seq.request_id, None)
        try:
            req.send.send_nowait(last)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        req.send.close()

    def _shutdown_requests(self) -> None:
        """Loop exit: end every request (queued or running) with "abort" (or the loop's failure)."""
        self._closing = True
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for kind, value in items:
            if kind == "add" and not value.done:
                self._finish(value, self._failure or self._abort_output(value))
        for rid in list(self._requests):
            req = self._requests[rid]
            if self.scheduler.get(rid) is not None:
                self.scheduler.abort(rid)
            if req.submitted:
                self._finish(req, self._failure or self._abort_output(req))

    def _abort_output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        if not seq.is_finished:
            seq.finish("abort")
        return RequestOutput(seq.request_id, [], "", seq.output_ids, True, "abort", seq.num_prompt_tokens,
                             max(seq.num_cached_tokens, 0), RequestStats(None, 0.0, 0.0, seq.num_preemptions))
