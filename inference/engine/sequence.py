"""Per-request state inside the serving engine: tokens, cache blocks, progress, streamed text.

A sequence's tokens are `prompt + output`; `num_computed_tokens` of them have their latents in the cache.
Each step computes some of the rest (a prefill chunk, or the newest token when decoding); a token is sampled
only when the step computes the sequence's last token. Preemption sets `num_computed_tokens` back to zero
and drops the block table; resuming recomputes (through the prefix cache where it can).
Stops (EOS, stop ids, stop strings, max_tokens) and the streamed text come from `sampling.StopChecker`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from deepseek_mcp.inference.engine.sampling import SamplingParams, StopChecker, TextDecoder

if TYPE_CHECKING:
    from deepseek_mcp.inference.engine.logits_process import LogitsProcessor


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SeqUpdate:
    """What one sequence produced in one step (or on abort)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop: int | str | None = None  # what ended it with "stop": the stop token id or the stop string


class NullDecoder:
    """Decoder for engines without a tokenizer: no text (stop strings then cannot match)."""

    def step(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logits_processors: tuple[LogitsProcessor, ...] = ()
    decoder: TextDecoder | None = None
    eos_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    status: SequenceStatus = field(init=False, default=SequenceStatus.WAITING)
    block_table: list[int] = field(init=False, default_factory=list)
    block_hashes: list[bytes] = field(init=False, default_factory=list)  # of the full blocks of token_ids
    num_computed_tokens: int = field(init=False, default=0)
    num_registered_blocks: int = field(init=False, default=0)  # leading blocks indexed in the prefix cache
    num_cached_tokens: int = field(init=False, default=-1)  # prefix hit at first admission; -1 before
    num_preemptions: int = field(init=False, default=0)
    draft_ids: list[int] = field(init=False, default_factory=list)  # proposed to follow token_ids (speculation)
    num_drafted: int = field(init=False, default=0)  # drafts verified so far
    num_accepted: int = field(init=False, default=0)  # of them, emitted
    num_verify_steps: int = field(init=False, default=0)  # steps that verified drafts
    finish_reason: str | None = field(init=False, default=None)
    first_token_time: float | None = field(init=False, default=None)
    last_token_time: float | None = field(init=False, default=None)
    _checker: StopChecker | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("empty prompt")
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def text(self) -> str:
        """Text emitted so far (the final output text once finished)."""
        return self._checker.text if self._checker is not None else ""

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def cap_length(self, max_total_tokens: int) -> None:
        """Limit prompt + output to `max_total_tokens` (the cache / model length); before the first token."""
        if self._checker is not None:
            raise RuntimeError("cap_length after generation started")
        room = max_total_tokens - self.num_prompt_tokens
        if room < self.params.max_tokens:
            self.params = replace(self.params, max_tokens=room)

    def append_token(self, token_id: int) -> SeqUpdate:
        """Add a sampled token, advance the streamed text, and decide whether the sequence stops."""
        if self._checker is None:
            self._checker = StopChecker(self.params, self.eos_id, self.decoder or NullDecoder())
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        token_id = int(token_id)
        self.token_ids.append(token_id)
        step = self._checker.step(token_id)
        if step.finish_reason is not None:
            self.status = SequenceStatus.FINISHED
            self.finish_reason = step.finish_reason
        return SeqUpdate(self.request_id, [token_id], step.text_delta, step.finished, step.finish_reason,
                         self._checker.matched)

    def append_tokens(self, token_ids: list[int]) -> SeqUpdate:
        """`append_token` for each (a verified speculation emits several) until one stops the sequence (the rest
        are dropped), as one update."""
        ids: list[int] = []
        text = ""
        update = None
        for t in token_ids:
            update = self.append_token(t)
            ids += update.new_token_ids
            text += update.text_delta
            if update.finished:
                break
        if update is None:
            raise ValueError("append_tokens needs at least one token")
        return SeqUpdate(self.request_id, ids, text, update.finished, update.finish_reason, update.stop)

    def finish(self, reason: str) -> SeqUpdate:
        """Stop from outside the token stream (abort); text held back for stop strings is dropped."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        return SeqUpdate(self.request_id, [], "", True, reason)
