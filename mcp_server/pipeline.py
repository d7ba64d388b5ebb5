"""The one request pipeline behind every front end (the MCP tools and the OpenAI / Anthropic routes).

A front end maps its request to a `Plan`, then `prepare` (prompt ids, sampling, reasoning budget, processors
compiled before anything runs) -> `check_queue` -> `run_choice` / `run_all` / `run_streaming` (one engine request
per choice, parsed as it decodes) -> `Choice`s, which it maps back to its wire format. Inside: one finish-reason
vocabulary (`RunResult.finish_reason`: stop | length | time | cancelled), one reasoning-token count, and the stop
the engine matched, carried out of it. No protocol here; conversations are the MCP front end's (service.py).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from deepseek_mcp.inference.constrained.tool_ban import ToolBan
from deepseek_mcp.inference.engine.async_engine import QueueFullError
from deepseek_mcp.inference.engine.distributed import WorkerFailure
from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.text.parse import Event, ParseResult, StreamParser, ToolCall
from deepseek_mcp.inference.text.template import THINK_END, render_ids
from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.constraints import GrammarConstraints, grammar_available, steered
from deepseek_mcp.mcp_server.engine_request import Decoded, RunResult, log_request, new_request_id, run_request
from deepseek_mcp.mcp_server.failures import GenerationFailed, GenerationTimeout, RequestError, ServerBusy
from deepseek_mcp.mcp_server.logprobs import StreamLogprobs, TokenLogprob, all_logprobs
from deepseek_mcp.mcp_server.metrics import Metrics
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.request_processors import LogprobRecorder, Penalties, ToolCallProcessors
from deepseek_mcp.mcp_server.schemas import ResponseFormat
from deepseek_mcp.mcp_server.tool_specs import ToolChoice, ToolSpec

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """One request, in terms of the pipeline. `messages` are template messages (OpenAI-style dicts);
    `prompts` instead of messages: raw prompts (completions), no template; choice i answers prompt i // n."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[list[int]] | None = None  # raw prompts (completions): one batch of n choices each
    continue_final: bool = False  # the last message is an assistant turn to continue (prefill)
    tools: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice | None = None  # None: no tools offered
    parallel_tool_calls: bool = True
    thinking: bool = False
    thinking_budget: int | None = None  # None: the server's default (when thinking)
    thinking_fraction: float | None = None  # reasoning_effort: this share of max_tokens
    response_format: ResponseFormat | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None  # None: off; else how many top alternatives per token (0-20)
    caller: str = "api"  # names the front end (the route) in each request's log line
    request_id: str | None = None  # the id the client sees (e.g. chatcmpl-...); None: a fresh mcp-... id

    @property
    def raw(self) -> bool:
        return self.prompts is not None


@dataclass
class Prepared:
    plan: Plan
    aengine: Any
    tokenizer: Any
    prompts: list[list[int]]  # one per prompt (one for chat and messages)
    prompt_params: list[SamplingParams]  # the sampling parameters of each prompt (max_tokens fits each)
    budget: int | None  # reasoning budget when thinking
    compiled: list[Any] | None = None  # a set of processors built by prepare, for the first choice that runs

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    @property
    def params(self) -> SamplingParams:
        return self.prompt_params[0]

    @property
    def total(self) -> int:
        """How many choices (engine requests) the plan makes: prompts x n."""
        return len(self.prompts) * self.plan.n


@dataclass
class Choice:
    index: int
    run: RunResult  # run.finish_reason: stop | length | time | cancelled; run.stop: what matched
    parsed: ParseResult
    calls: list[ToolCall]  # the calls to report (all the parser found; the first only if not parallel)
    call_ids: list[str]
    reasoning_tokens: int
    steered: bool  # a constraint restricted sampling to fit the output in max_tokens
    logprobs: list[TokenLogprob] | None = None  # per generated token (see logprobs.py)

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the output, if one did (and no tool call did)."""
        return self.run.stop if isinstance(self.run.stop, str) and not self.calls else None


def call_limit(plan: Plan) -> int:
    return 1 if not plan.parallel_tool_calls else 1 << 30


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def reasoning_tokens(token_ids: list[int], think_end_id: int | None, eos_id: int | None) -> int:
    """Tokens before the closing `</think>` (it is not counted), or all but a final EOS when it never came."""
    if think_end_id is not None and think_end_id in token_ids:
        return token_ids.index(think_end_id)
    return len(token_ids) - (1 if token_ids and token_ids[-1] == eos_id else 0)


OnEvents = Callable[[str, list[Event], list[TokenLogprob]], None]
Item = tuple[str, list[Event], list[TokenLogprob]]
OnItem = Callable[[int, "Item | Choice"], Awaitable[None]]


class Pipeline:
    """Template, sampling, constraints, the run and its parse, for any front end. `constraints` (grammar-
    constrained decoding) is on when the configuration asks for it and xgrammar is installed;
    `tool_call_processors` is the hook tool calls take their processors from (the constraints unless one is
    given)."""

    def __init__(self, host: ModelHost, config: ServerConfig, *,
                 tool_call_processors: ToolCallProcessors | None = None) -> None:
        self.host = host
        self.config = config
        self.constraints = GrammarConstraints() if config.constrained_decoding and grammar_available() else None
        self.tool_call_processors = tool_call_processors or self.constraints
        self.metrics = Metrics(host)  # this server's registry: every front end records into it

    # -- prepare --------------------------------------------------------------------------------------

    async def prepare(self, plan: Plan, progress: Progress | None = None) -> Prepared:
        """Prompt ids and sampling parameters for every prompt, once the model is ready (waiting for it, with
        progress); the processors are compiled once here, so a bad schema fails before anything runs."""
        progress = progress or Progress()
        if plan.prompts is None:
            tools = [s.as_openai() for s in plan.tools] or None
            aengine, tokenizer, prompt_ids = await self.render(plan.messages, progress, thinking=plan.thinking,
                                                               tools=tools, continue_final=plan.continue_final)
            prompts = [prompt_ids]
        else:
            aengine = await self.host.wait_ready(progress)
            tokenizer, prompts = self.host.engine.tokenizer, plan.prompts
        prompt_params = []
        for i, ids in enumerate(prompts):
            try:
                prompt_params.append(self.sampling(len(ids), max_tokens=plan.max_tokens,
                                                   temperature=plan.temperature, top_p=plan.top_p,
                                                   top_k=plan.top_k, seed=plan.seed, stop=plan.stop))
            except RequestError as e:
                raise (RequestError(f"prompt[{i}]: {e}") if len(prompts) > 1 else e) from None
        params = prompt_params[0]
        budget = None
        if plan.thinking:
            requested = plan.thinking_budget
            if requested is None and plan.thinking_fraction is not None:
                requested = max(1, min(int(params.max_tokens * plan.thinking_fraction), params.max_tokens - 1))
            budget = self.thinking_budget(requested, params.max_tokens)
        self.check_response_format(plan.response_format)
        prep = Prepared(plan, aengine, tokenizer, prompts, prompt_params, budget)
        prep.compiled = await self.processors(prep)
        return prep

    async def render(self, history: list[dict[str, Any]], progress: Progress, *, thinking: bool,
                     tools: list[dict[str, Any]] | None = None,
                     continue_final: bool = False) -> tuple[Any, Any, list[int]]:
        """(AsyncEngine, tokenizer, prompt ids) for a whole conversation, once the model is ready.
        `continue_final`: the last message is an assistant turn that generation continues (prefill)."""
        aengine = await self.host.wait_ready(progress)
        tokenizer = self.host.engine.tokenizer
        render = functools.partial(render_ids, history, tokenizer, tools=tools, thinking=thinking,
                                   continue_final_message=continue_final,
                                   trusted_control_tokens=self.config.trusted_control_tokens)
        try:
            prompt_ids = await self.host.tokenize(lambda limit: render(max_tokens=limit))
        except ValueError as e:
            raise RequestError(str(e)) from None
        return aengine, tokenizer, prompt_ids

    def sampling(self, num_prompt_tokens: int, *, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, seed: int | None, stop: Sequence[str] | None,
                 top_k: int | None = None) -> SamplingParams:
        """Sampling parameters with the server's defaults for what is None; max_tokens must fit the context."""
        context = self.host.context_tokens()
        room = context - num_prompt_tokens
        if room < 1:
            raise self.host.too_long(num_prompt_tokens)
        if max_tokens is None:
            max_tokens = min(self.config.limits.max_tokens, room)
        elif max_tokens > room:
            raise RequestError(f"max_tokens {max_tokens} does not fit: the prompt takes {num_prompt_tokens} "
                               f"of the {context}-token context; use max_tokens <= {room}")
        defaults = self.config.sampling
        try:
            return SamplingParams(
                temperature=defaults.temperature if temperature is None else temperature,
                top_p=defaults.top_p if top_p is None else top_p,
                top_k=defaults.top_k if top_k is None else top_k, seed=seed, max_tokens=max_tokens,
                stop=tuple(stop or ()),
            )
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None

    def thinking_budget(self, requested: int | None, max_tokens: int) -> int:
        """Reasoning tokens allowed before `</think>` is forced: the request's, else the server's default."""
        if requested is not None:
            if requested >= max_tokens:
                raise RequestError(f"thinking_budget {requested} leaves no room for the answer within max_tokens "
                                   f"{max_tokens}; lower thinking_budget or raise max_tokens above it")
            return requested
        return min(self.config.limits.thinking_budget or max_tokens // 2, max_tokens - 1)

    def check_response_format(self, fmt: ResponseFormat | None) -> ResponseFormat | None:
        """None for no constraint ({"type": "text"} too); refused when the server runs unconstrained."""
        if fmt is None or fmt.type == "text":
            return None
        if self.constraints is None:
            raise RequestError("response_format needs constrained decoding, which this server runs without "
                               "(constrained_decoding is off, or xgrammar is not installed on this platform); "
                               "omit response_format or enable it")
        return fmt

    # -- processors -----------------------------------------------------------------------------------

    async def processors(self, prep: Prepared) -> list[Any]:
        """A fresh set per engine request (processors are stateful)."""
        plan, max_tokens = prep.plan, prep.params.max_tokens
        out: list[Any] = [LogprobRecorder(plan.logprobs)] if plan.logprobs is not None else []
        if plan.presence_penalty or plan.frequency_penalty:
            out.append(Penalties(plan.presence_penalty, plan.frequency_penalty))
        if prep.budget is not None:
            out.append(ThinkingBudget(prep.budget, prep.tokenizer.token_to_id(THINK_END)))
        if plan.choice is not None:
            out += await self._tool_processors(prep.tokenizer, plan.tools, plan.choice, max_tokens,
                                               parallel_tool_calls=plan.parallel_tool_calls, thinking=plan.thinking)
        fmt = self.check_response_format(plan.response_format)
        if fmt is not None and self.constraints is not None:
            out += await self._constrain(functools.partial(
                self.constraints.response_format, tokenizer=prep.tokenizer, response_format=fmt.as_request(),
                max_tokens=max_tokens, vocab_size=self._vocab_size(), thinking=plan.thinking))
        return out

    async def _tool_processors(self, tokenizer: Any, specs: list[ToolSpec], choice: ToolChoice, max_tokens: int,
                               *, parallel_tool_calls: bool, thinking: bool) -> list[Any]:
        """Constrained tool calls (or, unconstrained, only "none" enforced by banning the call tokens)."""
        if self.tool_call_processors is not None:  # GrammarConstraints bans the calls itself for "none"
            options = {} if parallel_tool_calls and not thinking else {
                "parallel_tool_calls": parallel_tool_calls, "thinking": thinking}
            return await self._constrain(functools.partial(
                self.tool_call_processors, tokenizer=tokenizer, tools=specs, choice=choice,
                max_tokens=max_tokens, vocab_size=self._vocab_size(), **options))
        return [ToolBan.for_tokenizer(tokenizer)] if choice.mode == "none" else []

    def _vocab_size(self) -> int | None:
        engine = self.host.engine
        return None if engine is None else engine.config.vocab_size

    async def _constrain(self, build: Callable[[], Sequence[Any]]) -> list[Any]:
        """Build a request's processors off the event loop (a new schema compiles; the first call builds the
        grammar vocabulary). A schema the grammar engine cannot express, or a max_tokens below the shortest
        valid output, is the caller's to fix."""
        try:
            return list(await anyio.to_thread.run_sync(build))
        except ValueError as e:  # ConstraintError
            raise RequestError(str(e)) from None

    # -- run ------------------------------------------------------------------------------------------

    def check_queue(self, prep: Prepared) -> None:
        """Refuse up front what the engine's waiting bound would refuse (its own check backs this one up)."""
        aengine, bound = prep.aengine, getattr(prep.aengine, "max_waiting", None)
        if bound is not None and prep.total > bound + aengine.scheduler.max_num_seqs:
            raise RequestError(f"this request makes {prep.total} generations (prompts x n), more than the server "
                               f"batches and queues at once ({aengine.scheduler.max_num_seqs} slots + {bound}); "
                               "send fewer prompts or a smaller n")
        if bound is not None and aengine.num_without_slot(prep.total) > bound:
            raise ServerBusy(f"the request queue is full ({aengine.num_without_slot()} requests wait for a batch "
                             f"slot, bound {bound}); retry in a little while")

    async def run_choice(self, prep: Prepared, index: int, progress: Progress | None = None,
                         on_events: OnEvents | None = None) -> Choice:
        """Choice `index`: prompt index // n, sample index % n. `on_events(text delta, parser events, the
        log-probability entries whose text that delta completes)` as it decodes."""
        plan = prep.plan
        prompt, sample = divmod(index, plan.n)
        params, prompt_ids = prep.prompt_params[prompt], prep.prompts[prompt]
        if sample and params.seed is not None:  # n > 1 with a seed: distinct, reproducible samples
            params = replace(params, seed=(params.seed + sample) % (1 << 63))
        procs, prep.compiled = prep.compiled or await self.processors(prep), None  # stateful: one set per request
        recorder = next((p for p in procs if isinstance(p, LogprobRecorder)), None)
        feed = None
        if on_events is not None:
            live = StreamLogprobs(recorder, prep.tokenizer, params) if recorder is not None else None
            fed = 0

            def feed(d: Decoded) -> None:
                nonlocal fed
                fed += len(d.text)
                entries = [] if live is None else live.take(d.token_ids, fed if plan.raw else d.resolved)
                on_events(d.text, d.events, entries)

        names = [s.name for s in plan.tools] if plan.tools else None
        rid = plan.request_id if plan.request_id is None or prep.total == 1 else f"{plan.request_id}-{index}"
        run, parsed = await self.run(prep.aengine, prompt_ids, params, progress or Progress(),
                                     thinking=plan.thinking, tools=names, processors=procs, on_events=feed,
                                     tool=plan.caller, request_id=rid)
        calls = parsed.tool_calls[:call_limit(plan)]
        think_end = prep.tokenizer.token_to_id(THINK_END) if plan.thinking else None
        thought = reasoning_tokens(run.token_ids, think_end, prep.tokenizer.eos_id) if plan.thinking else 0
        logprobs = None if recorder is None else all_logprobs(recorder, prep.tokenizer, params, run.token_ids,
                                                               len(run.text))
        return Choice(index, run, parsed, calls, [new_call_id() for _ in calls], thought, steered(procs), logprobs)

    async def run_all(self, prep: Prepared) -> list[Choice]:
        """Every choice, batched together by the engine."""
        self.check_queue(prep)
        out: list[Choice | None] = [None] * prep.total
        errors: list[Exception] = []

        async def one(i: int) -> None:
            try:
                out[i] = await self.run_choice(prep, i)
            except Exception as e:  # reported below, once, as itself
                errors.append(e)
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for i in range(prep.total):
                tg.start_soon(one, i)
        if errors:
            raise errors[0]
        return [c for c in out if c is not None]

    async def run_streaming(self, prep: Prepared, on_item: OnItem, progress: Progress | None = None) -> None:
        """Run every choice; `on_item(index, (text delta, events, logprob entries))` as each decodes, then
        `on_item(index, Choice)` at its end.
        A failure cancels the other choices and is raised; cancelling the caller aborts every request."""
        self.check_queue(prep)
        send, recv = anyio.create_memory_object_stream[tuple[int, Any]](math.inf)
        error: Exception | None = None

        async def one(i: int) -> None:
            try:
                choice = await self.run_choice(prep, i, progress,
                                               on_events=lambda *item: send.send_nowait((i, item)))
                send.send_nowait((i, choice))
            except Exception as e:  # handed to the consumer, which stops everything
                send.send_nowait((i, e))

        async with anyio.create_task_group() as tg:
            for i in range(prep.total):
                tg.start_soon(one, i)
            done = 0
            async with recv:
                async for i, item in recv:
                    if isinstance(item, Exception):
                        error = item
                        break
                    try:
                        await on_item(i, item)
                    except Exception as e:  # e.g. the client went away mid-write: raised below as itself
                        error = e
                        break
                    if isinstance(item, Choice):
                        done += 1
                        if done == prep.total:
                            break
            tg.cancel_scope.cancel()
        send.close()
        if error is not None:
            raise error

    async def run(self, aengine: Any, prompt_ids: list[int], params: SamplingParams, progress: Progress, *,
                  thinking: bool, tools: list[str] | None = None, processors: Sequence[Any] = (),
                  on_events: Callable[[Decoded], None] | None = None, tool: str = "api",
                  request_id: str | None = None) -> tuple[RunResult, ParseResult]:
        """Generate and parse: the one run loop. `on_events(Decoded)` as the text decodes (and at the end,
        with the events of the parser's final flush). `tool` and `request_id` name the request in its log line
        (one per engine request) and in errors."""
        parser = StreamParser(thinking=thinking, tools=tools)
        fed = 0

        def on_output(token_ids: list[int], delta: str) -> None:
            nonlocal fed
            events = parser.feed(delta)
            fed += len(delta)
            if on_events is not None:
                on_events(Decoded(delta, events, token_ids, fed - parser.held_back))

        limits = self.config.limits
        request_id = request_id or new_request_id()
        try:
            run = await run_request(aengine, prompt_ids, params, processors=processors,
                                    progress=progress, time_limit_s=limits.max_wall_time_s,
                                    interval_s=limits.progress_interval_s, on_output=on_output,
                                    request_id=request_id)
        except QueueFullError as e:
            raise ServerBusy(f"{e}; retry in a little while") from None
        except WorkerFailure as e:  # written to be read: it names the rank that died or hung
            self.metrics.observe_abort("failed")
            log.error("request %s: %s", request_id, e)
            raise GenerationFailed(f"generation failed (request {request_id}): {e}") from e
        except Exception as e:  # the details (and traceback) stay in the server's log, under the request id
            self.metrics.observe_abort("failed")
            log.exception("request %s: generation failed", request_id)
            raise GenerationFailed(f"generation failed (request {request_id}); the server "
                                   "log on stderr has the details under that id. The server goes on serving: "
                                   "retry, or change the input") from e
        except BaseException:  # cancelled: the client went away, or the server is stopping (logged by who did)
            self.metrics.observe_abort("cancelled")
            raise
        if run.finish_reason == "time" and not run.token_ids:
            self.metrics.observe_abort("timeout")
            raise GenerationTimeout(
                f"the {limits.max_wall_time_s:g} s wall-time limit (--max-wall-time, limits.max_wall_time_s; "
                f"counted from admission, after {run.queued_s:.1f} s queued) ran out before the first output token: "
                f"prefilling the {len(prompt_ids)}-token prompt took all of it. Shorten the prompt or raise "
                "--max-wall-time")
        events = parser.finish()
        if on_events is not None and events:
            on_events(Decoded("", events, run.token_ids, fed))
        self.metrics.observe_run(run)
        log_request(tool, request_id, run)
        return run, parser.result()
