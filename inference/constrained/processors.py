"""Schema-constrained decoding: logits processors that make tool calls and JSON responses always parse and
validate, even when `max_tokens` runs out.

    factory = ConstraintFactory(tokenizer)                       # once per server (vocab + grammar cache)
    proc = factory.for_tools(tools, "required", max_tokens=256)  # one per request, before generation
    proc = factory.for_response_format({"type": "json_schema", "schema": {...}}, max_tokens=256)

Each processor follows the LogitsProcessor protocol (inference/engine/logits_process.py): `prepare(output_ids)` syncs
the grammar matcher and fills the token bitmask (the engine runs it during the forward), `__call__` applies it.

Budget steering. A random model never closes a string on its own, so grammar masking alone does not finish an
output within max_tokens. The `Planner` (inference/constrained/planner.py) computes a short completion (token ids ending
with EOS) of the matcher state. Invariant: that plan fits in the remaining budget R. Three bands:
  - far (R > len(plan) + slack + guard): the model samples freely under the grammar;
  - guard (R <= len(plan) + slack + guard): structural tokens (quotes, brackets, commas, colons, control
    tokens; every token inside a key or a tool name) are the only ones that can commit to more structure (an
    optional property, an array item, an anyOf branch, a longer tool). Only plan[0] and the model's top-k
    structural tokens whose own completion still fits stay allowed; text tokens stay free. `guard` is twice the
    schemas' static commit cost (schema.commit_cost);
  - zone (R <= len(plan) + slack): the same check for every token (top-k), so the model writes until the last
    moment and the output is complete when the budget ends (`steered`). slack also covers the spread of the
    offered tools' shortest calls and the largest jump seen so far.
`over_budget` reports a plan that no longer fits (then the output may be cut); the tests never see one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.grammars import Compiled
from deepseek_mcp.inference.constrained.lexer import OUTSIDE, Lex
from deepseek_mcp.inference.constrained.planner import Planner, completes
from deepseek_mcp.inference.constrained.tool_ban import ban_ids, ban_marker, marker_tail
from deepseek_mcp.inference.constrained.vocab import GrammarVocab

_NEG_INF = float("-inf")



@dataclass(frozen=True)
class GrammarStart:
    """Free text until `token`; then the grammar. `feed`: the token is the grammar's first token.
    `optional`: the output may end without it (auto tool choice); else it is forced when the budget says so."""

    token: int
    feed: bool
    optional: bool


FREE, GRAMMAR, FAILED = "free", "grammar", "failed"


class GrammarProcessor:
    """Enforces a compiled grammar on one request, steering to a complete output within `max_tokens`.

    Public state: `steered` (the budget zone restricted sampling at least once), `is_terminated` (the grammar
    is complete: only EOS can follow), `opened` (the grammar phase started; False in auto mode while the model
    writes text), `error` (a token the grammar rejected: then only EOS is allowed), `over_budget`,
    `min_tokens` (shortest complete output), `max_jump`, and timing counters `mask_seconds` / `plan_seconds` /
    `steps`. The budget zone starts at `remaining <= len(plan) + slack + max_jump`, where slack includes the
    spread of the offered tools' shortest calls (picking a long tool is the largest single jump).
    """

    def __init__(self, vocab: GrammarVocab, planner: Planner, compiled: Compiled, *,
                 max_tokens: int, start: GrammarStart | None = None, slack: int = 24, top_k: int = 8) -> None:
        self._vocab = vocab
        self._planner = planner
        self._matcher = xgr.GrammarMatcher(compiled.grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab.vocab_size)  # [1, ceil(V/32)] int32
        self._need_apply = True
        self.max_tokens = max_tokens
        self.start = start
        self.slack = slack + compiled.jump
        self.guard = 2 * compiled.commit  # a token may commit twice (e.g. `},{` opens an item and a key)
        self.top_k = top_k
        self.fresh_plans = 3
        # a candidate's plan is optional (without one the token is refused), so it gets a smaller budget than the
        # step's own plan: a string that cannot close within reach costs each of them its whole budget
        self.candidate_ops = 4000
        self.max_jump = 0  # largest growth of the completion seen after one token
        self.phase = FREE if start is not None else GRAMMAR
        self.opened = start is None
        self.steered = False
        self.over_budget = False
        self.error: str | None = None
        self.mask_seconds = 0.0
        self.plan_seconds = 0.0
        self.steps = 0
        self._seen = 0
        self._prepared_for = -1
        self._lex = Lex()
        self._tail = 0
        self._in_name = False  # between <｜tool▁call▁begin｜> and <｜tool▁sep｜>: name tokens pick the tool
        self._cand_plans: dict[int, list[int]] = {}
        self._stale: list[int] | None = None  # the last plan, to reuse while it still completes the grammar
        plan = self._timed_plan()
        if plan is None:
            raise ConstraintError(f"the grammar has no complete output within the {planner.max_bytes} tokens the "
                                  "planner looks ahead")
        self._plan: list[int] | None = plan
        self.min_tokens = len(plan) + (1 if start is not None and not start.feed else 0)
        tools = vocab.tools
        if start is None:
            ban: tuple[int, ...] = ()
        elif start.optional:  # auto: only the block opener, and only while a call still fits
            ban = tuple(t for t in tools.all_ids if t != start.token)
        else:  # reasoning first: no tool tokens, no EOS before the start token
            ban = (*tools.all_ids, vocab.eos_id)
        self._free_ban = torch.tensor(ban, dtype=torch.long)

    # -- protocol -------------------------------------------------------------------------------------

    @property
    def is_terminated(self) -> bool:
        return self.phase == GRAMMAR and (self._matcher.is_terminated() or self._matcher.is_completed())

    def update(self, output_ids: Sequence[int]) -> None:
        """Sync with the final output (the engine does not call processors after the last token)."""
        self._sync(output_ids)

    def prepare(self, output_ids: Sequence[int]) -> None:
        self._sync(output_ids)
        n = len(output_ids)
        if self._prepared_for == n:
            return
        self._prepared_for = n
        if self.phase != GRAMMAR or self._matcher.is_terminated():
            return
        t0 = time.perf_counter()
        self._need_apply = self._matcher.fill_next_token_bitmask(self._bitmask)
        self.mask_seconds += time.perf_counter() - t0
        self.steps += 1
        if self._plan is None:
            stale = self._stale
            self._plan = self._reuse_plan(self.max_tokens - n) or self._timed_plan()
            if self._plan is not None and stale:  # learn how far one token moved the completion
                self.max_jump = max(self.max_jump, len(self._plan) + 1 - len(stale))
            self._stale = None

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.prepare(output_ids)
        remaining = self.max_tokens - len(output_ids)
        if self.phase == FREE:
            return self._free(logits, remaining)
        if self.phase == FAILED or self._matcher.is_terminated():
            return _force(logits, self._vocab.eos_id)
        v = self._vocab.vocab_size
        if logits.shape[-1] > v:
            logits[v:] = _NEG_INF
        if self._need_apply:
            xgr.apply_token_bitmask_inplace(logits[:v].view(1, v), self._bitmask.to(logits.device))
        if self._lex.mode != OUTSIDE:
            # xgrammar's minLength/maxLength strings admit raw control bytes: not JSON, so ban them here
            ban_ids(logits, self._vocab.control_ids)
            ban_marker(logits, self._vocab.marker_ban, self._tail)
        plan = self._plan
        if plan is None:
            self.over_budget |= remaining <= self.slack  # no completion found: nothing to steer by
            return logits
        zone = len(plan) + self.slack + self.max_jump
        if remaining <= zone or (remaining <= zone + self.guard and (self._lex.key or self._in_name)):
            self._steer(logits, plan, remaining, None)
        elif remaining <= zone + self.guard:
            self._steer(logits, plan, remaining, self._vocab.structural_ids.to(logits.device))
        return logits

    # -- internals ------------------------------------------------------------------------------------

    def _reuse_plan(self, remaining: int) -> list[int] | None:
        """Far from the budget, the previous plan is good enough if it still completes the grammar (it
        usually does: the model wrote more text into an open string)."""
        stale = self._stale
        if not stale or remaining <= len(stale) + 2 * self.slack:
            return None
        t0 = time.perf_counter()
        ok = completes(self._matcher, stale)
        self.plan_seconds += time.perf_counter() - t0
        return stale if ok else None

    def _timed_plan(self) -> list[int] | None:
        t0 = time.perf_counter()
        plan = self._planner.plan(self._matcher, self._lex)
        self.plan_seconds += time.perf_counter() - t0
        return plan

    def _sync(self, output_ids: Sequence[int]) -> None:
        for t in output_ids[self._seen:]:
            self._advance(int(t))
        self._seen = len(output_ids)

    def _advance(self, token: int) -> None:
        if self.phase == FREE:
            assert self.start is not None
            if token == self.start.token:
                self.phase = GRAMMAR
                self.opened = True
                self._tail = 0
                if self.start.feed:
                    self._accept(token)
            else:
                self._tail = marker_tail(self._tail, self._vocab.token_bytes[token])
            return
        if self.phase == GRAMMAR and not self._matcher.is_terminated():
            self._accept(token)

    def _accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            self.phase = FAILED
            self.error = f"token {token} was rejected by the grammar"
            return
        self._lex = self._planner.lex(self._lex, token)
        tools = self._vocab.tools
        self._in_name = token == tools.call_begin or (self._in_name and token != tools.sep)
        self._tail = 0 if token in self._planner.specials else marker_tail(
            self._tail, self._vocab.token_bytes[token])
        plan = self._plan
        if plan and plan[0] == token:
            self._plan = plan[1:]
        else:
            self._plan = self._cand_plans.get(token)
            self._stale = plan
        self._cand_plans = {}

    def _free(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        assert self.start is not None
        if self._free_ban.numel():
            logits[self._free_ban.to(logits.device)] = _NEG_INF
        ban_marker(logits, self._vocab.marker_ban, self._tail)
        if self.start.optional:
            if remaining < self.min_tokens:  # a call opened now could not be finished
                logits[self.start.token] = _NEG_INF
        elif remaining <= self.min_tokens + self.slack:
            self.steered = True
            return _force(logits, self.start.token)
        return logits

    def _steer(self, logits: torch.Tensor, plan: list[int], remaining: int, pool: torch.Tensor | None) -> None:
        """Keep plan[0] and the top-k allowed tokens whose own completion still fits the budget. pool None: this
        applies to every token (the zone); else only to `pool` (the structural tokens, in the guard band before
        the zone: the only ones that can commit to more structure), the rest stay as the grammar allows."""
        t0 = time.perf_counter()
        if pool is None:
            self.steered = True
        keep: dict[int, list[int]] = {plan[0]: plan[1:]}
        if len(plan) > remaining:
            self.over_budget = True
        elif len(plan) < remaining:
            row = logits if pool is None else logits[pool]
            values, idx = torch.topk(row, min(self.top_k, row.shape[-1]))
            ids = idx if pool is None else pool[idx]
            fresh = self.fresh_plans  # full plans are the expensive part: a few per step
            for value, t in zip(values.tolist(), ids.tolist(), strict=True):
                if value == _NEG_INF or t in keep:
                    continue
                f = self._matcher.fork()
                if not f.accept_token(t):
                    continue
                if completes(f, plan):  # e.g. more text in an open string: the same completion still works
                    p: list[int] | None = plan
                elif fresh > 0:
                    fresh -= 1
                    p = self._planner.plan(f, self._planner.lex(self._lex, t), self.candidate_ops,
                                           max_tokens=remaining - 1)  # a longer plan would be refused below
                else:
                    continue
                if p is not None and 1 + len(p) <= remaining:
                    keep[t] = p
                else:
                    self.steered = True  # a token refused for lack of budget
        self._cand_plans = keep
        ids = torch.tensor(list(keep), dtype=torch.long, device=logits.device)
        kept = logits[ids].clone()
        if not bool(torch.isfinite(kept).any()):
            kept[0] = 0.0
        if pool is None:
            logits.fill_(_NEG_INF)
        else:
            logits[pool] = _NEG_INF
        logits[ids] = kept
        self.plan_seconds += time.perf_counter() - t0


def _force(logits: torch.Tensor, token: int) -> torch.Tensor:
    logits.fill_(_NEG_INF)
    logits[token] = 0.0
    return logits
