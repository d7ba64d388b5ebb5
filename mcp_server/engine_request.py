"""One generation request on the AsyncEngine: progress heartbeats, the wall-time limit, and abort on cancel.

Progress says where the request is: queued (waiting for a slot in the engine), prefilling (chunks of the prompt
done out of all), or generating (tokens, rate and the tail of the text so far). The wall-time limit counts from
admission (when the engine takes the request off its queue), so time spent queued is not held against it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio

from deepseek_mcp.mcp_server.progress import Progress

log = logging.getLogger(__name__)

# After the time limit aborts a request, how long to wait for the engine to end its stream before giving up on it.
_ABORT_GRACE_S = 5.0


def new_request_id() -> str:
    """The id a request carries in the engine, the logs and error messages."""
    return f"mcp-{uuid.uuid4().hex[:16]}"


@dataclass
class RunResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | time | cancelled: the one vocabulary inside (front ends map it)
    prompt_tokens: int
    cached_tokens: int
    elapsed_s: float
    queued_s: float = 0.0  # waiting for admission (the time limit starts after it)
    stop: int | str | None = None  # finished with "stop": the engine's matched stop token id or stop string
    ttft_s: float | None = None  # the engine's: submission to the first token
    decode_tok_s: float = 0.0  # the engine's: tokens per second after the first (0 with fewer than two)
    # One gap per token after the first (len(token_ids) - 1 of them): seconds since the engine delivered the
    # previous token. Tokens one step delivers together (a verified speculation, several at once) arrive
    # together: the first of them carries the gap, the others 0 (the pause a streaming client sees before each).
    inter_token_s: list[float] = field(default_factory=list)
    speculative: SpeculativeCounts | None = None  # when the engine decodes speculatively


@dataclass(frozen=True)
class SpeculativeCounts:
    """One request's speculative decoding: drafts verified, of them accepted, and steps that verified drafts."""

    draft_tokens: int
    accepted_tokens: int
    verify_steps: int


def speculative_usage(runs: list[RunResult]) -> dict[str, Any] | None:
    """The `speculative` block of a response's usage (None without speculative decoding): drafts verified and
    accepted, the acceptance rate, and the mean accepted length, tokens emitted per verifying step (the
    accepted drafts plus the target's own token, as vLLM's mean acceptance length)."""
    counts = [r.speculative for r in runs if r.speculative is not None]
    if not counts:
        return None
    drafted = sum(c.draft_tokens for c in counts)
    accepted = sum(c.accepted_tokens for c in counts)
    steps = sum(c.verify_steps for c in counts)
    return {"draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            "mean_accepted_length": round(1 + accepted / steps, 4) if steps else 0.0}


def with_speculative(usage: dict[str, Any], runs: list[RunResult]) -> dict[str, Any]:
    """`usage` with its `speculative` block where the engine decodes speculatively (else as it was)."""
    spec = speculative_usage(runs)
    return usage if spec is None else {**usage, "speculative": spec}


@dataclass(frozen=True)
class Decoded:
    """What a streaming caller gets as the output decodes: the text delta fed to the parser, the parser's
    events for it, every token id generated so far, and `resolved`, the characters of the output text the
    parser has reported (as events or markers); the text after them is held back (a possible marker)."""

    text: str
    events: list[Any]
    token_ids: list[int]
    resolved: int


@dataclass
class _Live:
    """What the heartbeat reports while the request runs."""

    started: float
    max_tokens: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    admitted_at: float | None = None  # when the engine took the request off its queue: the time limit starts
    text: list[str] = field(default_factory=list)

    def message(self, now: float, state: _EngineState | None) -> str:
        n = len(self.token_ids)
        if n == 0:
            if state is not None and state.queued:
                ahead = f", {state.ahead} ahead" if state.ahead else ""
                return f"queued: waiting for a free slot in the engine{ahead} ({now - self.started:.0f} s)"
            if state is not None and state.chunk_tokens > 0:
                total = -(-self.prompt_tokens // state.chunk_tokens)
                done = min(state.computed // state.chunk_tokens, total)
                return (f"prefilling the prompt: chunk {done}/{total} done ({state.computed}/{self.prompt_tokens} "
                        f"tokens, {now - (self.admitted_at or now):.0f} s)")
            return f"prefilling {self.prompt_tokens} prompt tokens ({now - self.started:.0f} s)"
        rate = n / max(now - (self.first_token_at or now), 1e-6) if n > 1 else 0.0
        return f"generated {n}/{self.max_tokens} tokens ({rate:.1f} tok/s): {_tail(''.join(self.text))}"


@dataclass(frozen=True)
class _EngineState:
    queued: bool  # still waiting for admission
    ahead: int  # requests queued before it
    computed: int  # prompt tokens in the cache
    chunk_tokens: int  # prefill chunk size (the scheduler's token budget per step)


def _engine_state(aengine: Any, request_id: str) -> _EngineState | None:
    """Where the request stands in the engine, read from the scheduler (None where the engine does not say).
    Read from the event loop while a step may run in the worker thread: plain attribute reads, retried next
    heartbeat if a queue changed under it."""
    scheduler = getattr(aengine, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "get"):
        return None
    try:
        seq = scheduler.get(request_id)
        chunk = int(getattr(scheduler, "max_num_batched_tokens", 0))
        if seq is None:  # submitted, not yet taken from the engine's inbox
            return _EngineState(True, len(scheduler.waiting), 0, chunk)
        if getattr(seq.status, "value", "") == "waiting" and seq.num_computed_tokens == 0:
            ahead = next((i for i, other in enumerate(list(scheduler.waiting)) if other is seq), 0)
            return _EngineState(True, ahead, 0, chunk)
        return _EngineState(False, 0, min(int(seq.num_computed_tokens), seq.num_prompt_tokens), chunk)
    except (RuntimeError, AttributeError, TypeError):
        return None


def _tail(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "..." + flat[-width:]


async def run_request(
    aengine: Any,
    prompt_ids: list[int],
    params: Any,
    *,
    processors: Sequence[Any] = (),
    progress: Progress | None = None,
    time_limit_s: float,
    interval_s: float = 0.5,
    on_output: Callable[[list[int], str], None] | None = None,
    request_id: str | None = None,
) -> RunResult:
    """Stream one request to the end. A cancelled caller aborts it (freeing its cache) before unwinding.
    `on_output(all generated ids, the text delta)` after each engine output that brings text."""
    progress = progress or Progress()
    request_id = request_id or new_request_id()
    live = _Live(started=time.monotonic(), max_tokens=params.max_tokens, prompt_tokens=len(prompt_ids))
    texts = live.text
    finish: str | None = None
    stop: int | str | None = None
    stats: Any = None  # the engine's RequestStats of its last output
    timed_out = False
    cached = 0
    gaps: list[float] = []  # RunResult.inter_token_s
    delivered_at: float | None = None  # the engine's clock (seconds since submission) at the last tokens
    stream_scope = anyio.CancelScope()

    async def heartbeat() -> None:
        nonlocal timed_out
        while True:
            now = time.monotonic()
            state = _engine_state(aengine, request_id)
            if live.admitted_at is None and (state is None or not state.queued or live.token_ids):
                live.admitted_at = now  # the wall-time limit counts from here: queueing is not generation
            await progress.update(len(live.token_ids), live.max_tokens, live.message(now, state))
            deadline = None if live.admitted_at is None else live.admitted_at + time_limit_s
            if not timed_out and deadline is not None and now >= deadline:
                timed_out = True
                log.info("request %s hit the %.1f s time limit (from admission) after %d tokens", request_id,
                         time_limit_s, len(live.token_ids))
                aengine.abort(request_id)
                stream_scope.deadline = now + _ABORT_GRACE_S  # the engine ends the stream; don't wait forever
            wake = now + interval_s if timed_out or deadline is None else min(now + interval_s, deadline)
            await anyio.sleep(max(wake - time.monotonic(), 0.0))

    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            try:
                with stream_scope:
                    stream = aengine.stream(prompt_ids, params, request_id=request_id,
                                            logits_processors=processors)
                    async with aclosing(stream):
                        async for out in stream:
                            if out.new_token_ids:
                                if live.first_token_at is None:
                                    live.first_token_at = time.monotonic()
                                # the engine's clock where it says (stats: since submission), else ours
                                at = out.stats.elapsed_s if out.stats is not None else time.monotonic() - live.started
                                if delivered_at is not None:  # else these are the first: no gap before
                                    gaps.append(at - delivered_at)
                                gaps.extend([0.0] * (len(out.new_token_ids) - 1))  # came with the first
                                delivered_at = at
                            live.token_ids = out.token_ids  # a fresh list per update (a slice)
                            cached = out.num_cached_tokens or 0
                            stats = out.stats
                            if out.text_delta:
                                texts.append(out.text_delta)
                                if on_output is not None:
                                    on_output(out.token_ids, out.text_delta)
                            if out.finished:
                                finish, stop = out.finish_reason, out.stop
                                break
            except Exception as e:  # re-raised below as itself, not wrapped in the task group's ExceptionGroup
                error = e
            tg.cancel_scope.cancel()
    finally:
        if finish is None:
            aengine.abort(request_id)  # cancelled caller, or an error: free the request's cache blocks now
    if error is not None:
        raise error

    if finish in ("stop", "length"):
        reason = finish  # also when it finished just as the time limit struck
    elif timed_out:
        reason = "time"
    else:
        reason = "cancelled"  # aborted by someone else (e.g. engine shutdown) or the stream ended early
    end = time.monotonic()
    return RunResult(live.token_ids, "".join(texts), reason, len(prompt_ids), cached, end - live.started,
                     (live.admitted_at or end) - live.started, stop if reason == "stop" else None,
                     None if stats is None else stats.ttft_s, 0.0 if stats is None else stats.tokens_per_s,
                     gaps, None if stats is None or not getattr(aengine, "speculative_tokens", 0) else
                     SpeculativeCounts(stats.num_drafted, stats.num_accepted, stats.num_verify_steps))


def log_request(route: str, request_id: str, run: RunResult) -> None:
    """The request's one log line: its tokens, where its time went and how it finished; the same numbers as
    structured fields (`--log-format json`)."""
    n = len(run.token_ids)
    ttft = "-" if run.ttft_s is None else f"{run.ttft_s:.2f} s"
    fields = {"route": route, "request_id": request_id, "prompt_tokens": run.prompt_tokens,
              "cached_tokens": run.cached_tokens, "completion_tokens": n, "queued_s": round(run.queued_s, 4),
              "ttft_s": None if run.ttft_s is None else round(run.ttft_s, 4),
              "decode_tok_s": round(run.decode_tok_s, 2), "elapsed_s": round(run.elapsed_s, 4),
              "finish_reason": run.finish_reason}
    spec = speculative_usage([run])
    drafts = ""
    if spec is not None:
        fields["speculative"] = spec
        drafts = f", {spec['accepted_tokens']}/{spec['draft_tokens']} drafts accepted"
    log.info("%s %s: %d prompt tokens (%d cached), %d completion tokens, queued %.2f s, first token %s, %.1f tok/s "
             "decoding%s, %.2f s in all, finish %s", route, request_id, run.prompt_tokens, run.cached_tokens, n,
             run.queued_s, ttft, run.decode_tok_s, drafts, run.elapsed_s, run.finish_reason,
             extra={"fields": fields})
