"""The API-neutral generation step: a `Plan` (what either API asked for) -> prompt ids and processors -> one
engine request per choice (`n` of them run together in the batch) -> parsed `Choice`s, or parser events as they
decode. Everything model-facing goes through ChatService (template, sampling, constraints, run + parse)."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.text.parse import Event, ParseResult, ToolCall
from deepseek_mcp.inference.text.template import BOS, THINK_END
from deepseek_mcp.mcp_server.api.errors import ApiError
from deepseek_mcp.mcp_server.api.logprobs import StreamLogprobs, TokenLogprob, all_logprobs
from deepseek_mcp.mcp_server.engine_request import Decoded, RunResult
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.request_processors import LogprobRecorder, Penalties
from deepseek_mcp.mcp_server.schemas import ResponseFormat
from deepseek_mcp.mcp_server.service import ChatService, RequestError
from deepseek_mcp.mcp_server.tool_specs import ToolChoice, ToolSpec


@dataclass
class Plan:
    """One API request, in terms of the service. `messages` are template messages (OpenAI-style dicts);
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
    run: RunResult
    parsed: ParseResult
    calls: list[ToolCall]  # the calls the API reports (all the parser found; the first only if not parallel)
    call_ids: list[str]
    reasoning_tokens: int
    finish: str  # stop | length | tool_calls
    stop_sequence: str | None  # the stop string that ended the output, if one did
    logprobs: list[TokenLogprob] | None = None  # per generated token (see logprobs.py)


def call_limit(plan: Plan) -> int:
    return 1 if not plan.parallel_tool_calls else 1 << 30


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def signature(reasoning: str) -> str:
    """An opaque, stable `signature` for a thinking block (Anthropic clients send it back; we ignore it)."""
    return "dsmcp-" + hashlib.sha256(reasoning.encode()).hexdigest()[:48]


def check_ready(service: ChatService) -> None:
    """While the model loads: 503 with Retry-After (the API does not wait); after a failed load: 503 with
    the cause."""
    host = service.host
    if host.status == "loading":
        raise ApiError(503, f"the model {host.name} is still loading ({host.load_elapsed():.0f} s so far); retry "
                            "shortly (GET /health says when it is ready)", code="model_loading",
                       headers={"Retry-After": "5"})
    if host.status == "failed":
        raise ApiError(503, f"the model {host.source} failed to load: {host.error}", code="model_failed")


def check_queue(prep: Prepared) -> None:
    """Refuse up front (429) when the engine's queue cannot take the plan's requests."""
    bound = getattr(prep.aengine, "max_waiting", None)
    if bound and prep.total > bound:  # (a bound of 0 refuses everything: the 429 below)
        raise ApiError(400, f"this request makes {prep.total} generations (prompts x n), more than the server's "
                            f"queue holds ({bound}); send fewer prompts or a smaller n", param="prompt",
                       code="invalid_request")
    if bound is not None and prep.aengine.num_waiting() + prep.total > bound:
        raise ApiError(429, f"the request queue is full ({prep.aengine.num_waiting()} waiting, bound {bound}); "
                            "retry in a little while", code="queue_full", headers={"Retry-After": "1"})


async def prepare(service: ChatService, plan: Plan, progress: Progress | None = None) -> Prepared:
    progress = progress or Progress()
    check_ready(service)
    if plan.prompts is None:
        tools = [s.as_openai() for s in plan.tools] or None
        aengine, tokenizer, prompt_ids = await service.render(plan.messages, progress, thinking=plan.thinking,
                                                              tools=tools, continue_final=plan.continue_final)
        prompts = [prompt_ids]
    else:
        aengine = await service.host.wait_ready(progress)
        tokenizer, prompts = service.host.engine.tokenizer, plan.prompts
    prompt_params = []
    for i, ids in enumerate(prompts):
        try:
            prompt_params.append(service.sampling(len(ids), max_tokens=plan.max_tokens,
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
        budget = service.thinking_budget(requested, params.max_tokens)
    service.check_response_format(plan.response_format)
    prep = Prepared(plan, aengine, tokenizer, prompts, prompt_params, budget)
    await processors(service, prep)  # compile once now: a bad schema is a 400 before anything streams
    return prep


def raw_prompt_ids(tokenizer: Any, prompt: str, suffix: str | None) -> list[int]:
    """BOS + prompt, or fill-in-the-middle: BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>."""
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.token_to_id(BOS)
    if suffix is None:
        return [bos, *tokenizer.encode(prompt)]
    ids = [tokenizer.token_to_id(t) for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")]
    if any(i is None for i in ids):
        raise RequestError("suffix (fill-in-the-middle) needs the FIM tokens, which this tokenizer lacks")
    begin, hole, end = ids
    return [bos, begin, *tokenizer.encode(prompt), hole, *tokenizer.encode(suffix), end]


async def processors(service: ChatService, prep: Prepared) -> list[Any]:
    """A fresh set per engine request (processors are stateful)."""
    plan, max_tokens = prep.plan, prep.params.max_tokens
    out: list[Any] = [LogprobRecorder(plan.logprobs)] if plan.logprobs is not None else []
    if plan.presence_penalty or plan.frequency_penalty:
        out.append(Penalties(plan.presence_penalty, plan.frequency_penalty))
    if prep.budget is not None:
        out.append(ThinkingBudget(prep.budget, prep.tokenizer.token_to_id(THINK_END)))
    if plan.choice is not None:
        out += await service.tool_processors(prep.tokenizer, plan.tools, plan.choice, max_tokens,
                                             parallel_tool_calls=plan.parallel_tool_calls, thinking=plan.thinking)
    if plan.response_format is not None:
        out += await service.format_processors(prep.tokenizer, plan.response_format, max_tokens,
                                               thinking=plan.thinking)
    return out


OnEvents = Callable[[str, list[Event], list[TokenLogprob]], None]


async def run_choice(service: ChatService, prep: Prepared, index: int, progress: Progress | None = None,
                     on_events: OnEvents | None = None) -> Choice:
    """Choice `index`: prompt index // n, sample index % n. `on_events(text delta, parser events, the
    log-probability entries whose text that delta completes)` as it decodes."""
    prompt, sample = divmod(index, prep.plan.n)
    params, prompt_ids = prep.prompt_params[prompt], prep.prompts[prompt]
    if sample and params.seed is not None:  # n > 1 with a seed: distinct, reproducible samples
        params = replace(params, seed=(params.seed + sample) % (1 << 63))
    procs = await processors(service, prep)
    recorder = next((p for p in procs if isinstance(p, LogprobRecorder)), None)
    names = [s.name for s in prep.plan.tools] if prep.plan.tools else None
    feed = None
    if on_events is not None:
        live = StreamLogprobs(recorder, prep.tokenizer, params) if recorder is not None else None
        fed = 0

        def feed(d: Decoded) -> None:
            nonlocal fed
            fed += len(d.text)
            entries = [] if live is None else live.take(d.token_ids, fed if prep.plan.raw else d.resolved)
            on_events(d.text, d.events, entries)

    run, parsed = await service.run(prep.aengine, prompt_ids, params, progress or Progress(),
                                    thinking=prep.plan.thinking, tools=names, processors=procs, on_events=feed)
    calls = parsed.tool_calls[:call_limit(prep.plan)]
    think_end = prep.tokenizer.token_to_id(THINK_END)
    if not prep.plan.thinking:
        reasoning_tokens = 0
    elif think_end in run.token_ids:
        reasoning_tokens = run.token_ids.index(think_end)
    else:
        reasoning_tokens = len(run.token_ids)
    if run.finish_reason in ("length", "time"):
        finish = "length"
    else:
        finish = "tool_calls" if calls else "stop"
    stop_sequence = _stop_sequence(prep, params, run) if finish == "stop" else None
    logprobs = None if recorder is None else all_logprobs(recorder, prep.tokenizer, params, run.token_ids,
                                                           len(run.text))
    return Choice(index, run, parsed, calls, [new_call_id() for _ in calls], reasoning_tokens, finish,
                  stop_sequence, logprobs)


def _stop_sequence(prep: Prepared, params: SamplingParams, run: RunResult) -> str | None:
    stops = params.stop
    if not stops or (run.token_ids and run.token_ids[-1] == prep.tokenizer.eos_id):
        return None
    full = prep.tokenizer.decode(run.token_ids)
    cut = full.find(run.text) + len(run.text) if run.text else 0
    rest = full[cut:]
    return next((s for s in stops if rest.startswith(s)), next((s for s in stops if s in rest), None))


async def run_all(service: ChatService, prep: Prepared) -> list[Choice]:
    """Every choice, batched together by the engine."""
    check_queue(prep)
    out: list[Choice | None] = [None] * prep.total
    errors: list[Exception] = []

    async def one(i: int) -> None:
        try:
            out[i] = await run_choice(service, prep, i)
        except Exception as e:  # reported below, once, as itself
            errors.append(e)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i in range(prep.total):
            tg.start_soon(one, i)
    if errors:
        raise errors[0]
    return [c for c in out if c is not None]


Item = tuple[str, list[Event], list[TokenLogprob]]
OnItem = Callable[[int, "Item | Choice"], Awaitable[None]]


async def run_streaming(service: ChatService, prep: Prepared, on_item: OnItem,
                        progress: Progress | None = None) -> None:
    """Run every choice; `on_item(index, (text delta, events, logprob entries))` as each decodes, then
    `on_item(index, Choice)` at its end.
    A failure cancels the other choices and is raised; cancelling the caller aborts every request."""
    send, recv = anyio.create_memory_object_stream[tuple[int, Any]](math.inf)
    error: Exception | None = None

    async def one(i: int) -> None:
        try:
            choice = await run_choice(service, prep, i, progress,
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
