"""Domain logic of the tools: inputs -> prompt ids -> AsyncEngine -> parsed output -> result models.

Depends only on the engine interfaces (template, parser, sampling, logits processors, AsyncEngine via the
ModelHost), never on MCP: the server module adapts these calls to the protocol.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from deepseek_mcp.inference.constrained.tool_ban import ToolBan
from deepseek_mcp.inference.engine.async_engine import QueueFullError
from deepseek_mcp.inference.engine.distributed import WorkerFailure
from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.text.control import THINK_END
from deepseek_mcp.inference.text.parse import StreamParser
from deepseek_mcp.inference.text.template import render_ids
from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.constraints import GrammarConstraints, grammar_available, steered
from deepseek_mcp.mcp_server.conversations import Conversation, ConversationStore, TurnLocks, UnknownConversation
from deepseek_mcp.mcp_server.engine_request import Decoded, RunResult, new_request_id, run_request
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.model_info import count_parameters, describe_model
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.request_processors import ToolCallProcessors
from deepseek_mcp.mcp_server.schemas import (
    ChatInput,
    ChatOutput,
    GenerationInput,
    InvalidToolCall,
    ListModelsOutput,
    ModelInfo,
    ResetInput,
    ResetOutput,
    ResponseFormat,
    ThinkInput,
    ThinkOutput,
    ToolCallInput,
    ToolCallOut,
    ToolCallOutput,
    Usage,
)
from deepseek_mcp.mcp_server.tool_specs import (
    BadToolSpec,
    ToolChoice,
    ToolSpec,
    check_call,
    check_json,
    normalize_choice,
    normalize_tools,
)

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """Input the server cannot serve; the message says what to change."""


class GenerationFailed(RuntimeError):
    """The engine failed while generating (the cause is in the message); the server goes on serving."""


class ServerBusy(GenerationFailed):
    """The engine's request queue is full; nothing was queued. Retry in a little while."""


_Req = TypeVar("_Req", bound=GenerationInput)
_Out = TypeVar("_Out")


def _one_turn_at_a_time(
    method: Callable[[ChatService, _Req, Progress], Awaitable[_Out]],
) -> Callable[[ChatService, _Req, Progress], Awaitable[_Out]]:
    """Calls that continue one conversation run one after another, in arrival order, so no turn is lost."""

    @functools.wraps(method)
    async def wrapper(self: ChatService, req: _Req, progress: Progress) -> _Out:
        async with self._turn(req.conversation_id, progress):
            return await method(self, req, progress)

    return wrapper


@dataclass
class _Prepared:
    conv: Conversation
    new_messages: list[dict[str, Any]]
    prompt_ids: list[int]
    params: SamplingParams
    aengine: Any
    tokenizer: Any
    tool: str = "generate"  # for the log line


class ChatService:
    """`constraints` (grammar-constrained decoding) is on when the configuration asks for it and xgrammar is
    installed; `tool_call_processors` is the hook tool_call takes its processors from (the constraints unless
    one is given)."""

    def __init__(self, host: ModelHost, config: ServerConfig, *,
                 tool_call_processors: ToolCallProcessors | None = None) -> None:
        self.host = host
        self.config = config
        self.conversations = ConversationStore(config.limits.max_conversations,
                                               config.limits.max_conversation_tokens)
        self.turns = TurnLocks()
        self.constraints = GrammarConstraints() if config.constrained_decoding and grammar_available() else None
        self.tool_call_processors = tool_call_processors or self.constraints
        self._num_parameters: int | None = None

    # -- tools ----------------------------------------------------------------------------------------

    @_one_turn_at_a_time
    async def chat(self, req: ChatInput, progress: Progress) -> ChatOutput:
        fmt = self._response_format(req)
        prep = await self._prepare(req, progress, thinking=False)
        processors = await self._format_processors(prep, fmt, thinking=False)
        run, parsed = await self._run(prep, progress, thinking=False, processors=processors)
        value, error = check_json(parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(prep, {"role": "assistant", "content": parsed.content}, run)
        return ChatOutput(text=parsed.content, finish_reason=run.finish_reason, usage=_usage(run),
                          conversation_id=prep.conv.id, model=self.host.name, steered=steered(processors),
                          parsed=value, parse_error=error)

    @_one_turn_at_a_time
    async def think(self, req: ThinkInput, progress: Progress) -> ThinkOutput:
        fmt = self._response_format(req)
        prep = await self._prepare(req, progress, thinking=True)
        budget = self.thinking_budget(req.thinking_budget, prep.params.max_tokens)
        think_end_id = prep.tokenizer.token_to_id(THINK_END)
        grammar = await self._format_processors(prep, fmt, thinking=True)
        run, parsed = await self._run(prep, progress, thinking=True,
                                      processors=[ThinkingBudget(budget, think_end_id), *grammar])
        closed = think_end_id in run.token_ids
        reasoning_tokens = _reasoning_tokens(run.token_ids, think_end_id, prep.tokenizer.eos_id)
        value, error = check_json(parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(prep, {"role": "assistant", "content": parsed.content}, run)
        return ThinkOutput(text=parsed.content, answer=parsed.content, reasoning=parsed.reasoning,
                           reasoning_tokens=reasoning_tokens, reasoning_complete=closed,
                           finish_reason=run.finish_reason, usage=_usage(run), conversation_id=prep.conv.id,
                           model=self.host.name, steered=steered(grammar), parsed=value, parse_error=error)

    @_one_turn_at_a_time
    async def tool_call(self, req: ToolCallInput, progress: Progress) -> ToolCallOutput:
        try:
            specs = normalize_tools(req.tools)
            choice = normalize_choice(req.tool_choice, specs)
        except BadToolSpec as e:
            raise RequestError(str(e)) from None
        prep = await self._prepare(req, progress, thinking=False, tools=[s.as_openai() for s in specs])
        processors = await self.tool_processors(prep.tokenizer, specs, choice, prep.params.max_tokens)
        run, parsed = await self._run(prep, progress, thinking=False, tools=[s.name for s in specs],
                                      processors=processors)
        by_name = {s.name: s for s in specs}
        calls: list[ToolCallOut] = []
        invalid: list[InvalidToolCall] = []
        for call in parsed.tool_calls:
            if not call.valid:
                invalid.append(InvalidToolCall(name=call.name or None, raw=call.raw,
                                               error=call.error or "incomplete call"))
                continue
            arguments, error = check_call(call.name, call.arguments, by_name)
            if arguments is None:
                invalid.append(InvalidToolCall(name=call.name, raw=call.raw, error=error))
            else:
                calls.append(ToolCallOut(id="call_" + secrets.token_hex(8), name=call.name, arguments=arguments))
        reply: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if calls:
            reply["tool_calls"] = [c.model_dump() for c in calls]
        self._remember(prep, reply, run)
        return ToolCallOutput(text=parsed.content, tool_calls=calls, invalid_tool_calls=invalid,
                              finish_reason=run.finish_reason, usage=_usage(run), conversation_id=prep.conv.id,
                              model=self.host.name, steered=steered(processors))

    def reset_conversation(self, req: ResetInput) -> ResetOutput:
        try:
            removed = self.conversations.remove(req.conversation_id)
        except UnknownConversation:
            raise RequestError(_unknown_conversation(req.conversation_id, self.conversations.capacity)) from None
        return ResetOutput(conversation_id=req.conversation_id, removed_messages=removed)

    def list_models(self) -> ListModelsOutput:
        return ListModelsOutput(models=[self.model_info()])

    def model_info(self) -> ModelInfo:
        if self._num_parameters is None and self.host.engine is not None:
            self._num_parameters = count_parameters(self.host.engine)
        return describe_model(self.host, self.config, self._num_parameters)

    # -- shared steps ---------------------------------------------------------------------------------

    async def _prepare(self, req: GenerationInput, progress: Progress, *, thinking: bool,
                       tools: list[dict[str, Any]] | None = None) -> _Prepared:
        if (req.prompt is None) == (req.messages is None):
            which = "neither" if req.prompt is None else "both"
            raise RequestError(f"give exactly one of `prompt` (a string) or `messages` (a list of "
                               f"{{role, content}}); you gave {which}")
        if req.conversation_id is not None:
            try:
                conv = self.conversations.get(req.conversation_id)
            except UnknownConversation:
                raise RequestError(_unknown_conversation(req.conversation_id, self.conversations.capacity)) from None
        else:
            conv = Conversation(self.conversations.new_id())
        if req.system is not None:
            conv.system = req.system
        if req.prompt is not None:
            new = [{"role": "user", "content": req.prompt}]
        else:
            new = [m.model_dump(exclude_none=True) for m in req.messages or []]
        if not new:
            raise RequestError("messages is empty; give at least one message ending with the user's turn")
        if new[-1]["role"] not in ("user", "tool"):
            raise RequestError(f"the last message has role '{new[-1]['role']}'; end `messages` with the turn "
                               "to answer: a 'user' message, or 'tool' results after the assistant's tool calls")
        history = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.messages + new

        aengine, tokenizer, prompt_ids = await self.render(history, progress, thinking=thinking, tools=tools)
        params = self.sampling(len(prompt_ids), max_tokens=req.max_tokens, temperature=req.temperature,
                               top_p=req.top_p, seed=req.seed, stop=req.stop)
        return _Prepared(conv, new, prompt_ids, params, aengine, tokenizer, _tool_name(req))

    # -- steps shared with the HTTP APIs (mcp_server/api), which keep no conversation state ------------

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
            prompt_ids = await anyio.to_thread.run_sync(render)
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
            raise RequestError(f"the prompt is {num_prompt_tokens} tokens but the context holds {context} "
                               f"({self.host.context_limit()}); shorten the prompt or messages, or start a new "
                               "conversation (omit conversation_id)")
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

    async def tool_processors(self, tokenizer: Any, specs: list[ToolSpec], choice: ToolChoice, max_tokens: int,
                              *, parallel_tool_calls: bool = True, thinking: bool = False) -> list[Any]:
        """Constrained tool calls (or, unconstrained, only "none" enforced by banning the call tokens)."""
        if self.tool_call_processors is not None:  # GrammarConstraints bans the calls itself for "none"
            options = {} if parallel_tool_calls and not thinking else {
                "parallel_tool_calls": parallel_tool_calls, "thinking": thinking}
            return await self._constrain(functools.partial(
                self.tool_call_processors, tokenizer=tokenizer, tools=specs, choice=choice,
                max_tokens=max_tokens, vocab_size=self._vocab_size(), **options))
        return [ToolBan.for_tokenizer(tokenizer)] if choice.mode == "none" else []

    async def run(self, aengine: Any, prompt_ids: list[int], params: SamplingParams, progress: Progress, *,
                  thinking: bool, tools: list[str] | None = None, processors: Sequence[Any] = (),
                  on_events: Callable[[Decoded], None] | None = None,
                  tool: str = "api") -> tuple[RunResult, Any]:
        """Generate and parse; `on_events(Decoded)` as the text decodes (and at the end, with the events of
        the parser's final flush). `tool` names the caller in the log line of the finished request."""
        parser = StreamParser(thinking=thinking, tools=tools)
        ids: list[int] = []
        fed = 0

        def feed(delta: str) -> None:
            nonlocal fed
            events = parser.feed(delta)
            fed += len(delta)
            if on_events is not None:
                on_events(Decoded(delta, events, ids, fed - parser.held_back))

        def on_tokens(token_ids: list[int]) -> None:
            nonlocal ids
            ids = token_ids

        limits = self.config.limits
        request_id = new_request_id()
        try:
            run = await run_request(aengine, prompt_ids, params, processors=processors,
                                    progress=progress, time_limit_s=limits.max_wall_time_s,
                                    interval_s=limits.progress_interval_s, on_text=feed,
                                    on_tokens=on_tokens, request_id=request_id)
        except QueueFullError as e:
            raise ServerBusy(f"{e}; retry in a little while") from None
        except WorkerFailure as e:  # written to be read: it names the rank that died or hung
            log.error("request %s: %s", request_id, e)
            raise GenerationFailed(f"generation failed (request {request_id}): {e}") from e
        except Exception as e:  # the details (and traceback) stay in the server's log, under the request id
            log.exception("request %s: generation failed", request_id)
            raise GenerationFailed(f"generation failed (request {request_id}); the server "
                                   "log on stderr has the details under that id. The server goes on serving: "
                                   "retry, or change the input") from e
        if run.finish_reason == "time" and not run.token_ids:
            raise RequestError(
                f"the {limits.max_wall_time_s:g} s wall-time limit (--max-wall-time, limits.max_wall_time_s; "
                f"counted from admission, after {run.queued_s:.1f} s queued) ran out before the first output token: "
                f"prefilling the {len(prompt_ids)}-token prompt took all of it. Shorten the prompt or raise "
                "--max-wall-time")
        events = parser.finish()
        if on_events is not None and events:
            on_events(Decoded("", events, run.token_ids, fed))
        n = len(run.token_ids)
        log.info("%s %s: %d prompt tokens (%d cached), %d completion tokens, %.2f s (%.2f s queued), %.1f tok/s, "
                 "finish %s", tool, request_id, run.prompt_tokens, run.cached_tokens, n, run.elapsed_s,
                 run.queued_s, n / max(run.elapsed_s - run.queued_s, 1e-9), run.finish_reason)
        return run, parser.result()

    async def _run(self, prep: _Prepared, progress: Progress, *, thinking: bool, tools: list[str] | None = None,
                   processors: Sequence[Any] = ()) -> tuple[RunResult, Any]:
        return await self.run(prep.aengine, prep.prompt_ids, prep.params, progress, thinking=thinking,
                              tools=tools, processors=processors, tool=prep.tool)

    def _response_format(self, req: ChatInput) -> ResponseFormat | None:
        return self.check_response_format(req.response_format)

    def check_response_format(self, fmt: ResponseFormat | None) -> ResponseFormat | None:
        """None for no constraint ({"type": "text"} too); refused when the server runs unconstrained."""
        if fmt is None or fmt.type == "text":
            return None
        if self.constraints is None:
            raise RequestError("response_format needs constrained decoding, which this server runs without "
                               "(constrained_decoding is off, or xgrammar is not installed on this platform); "
                               "omit response_format or enable it")
        return fmt

    async def _format_processors(self, prep: _Prepared, fmt: ResponseFormat | None, *, thinking: bool) -> list[Any]:
        return await self.format_processors(prep.tokenizer, fmt, prep.params.max_tokens, thinking=thinking)

    async def format_processors(self, tokenizer: Any, fmt: ResponseFormat | None, max_tokens: int, *,
                                thinking: bool) -> list[Any]:
        if fmt is None or self.constraints is None:
            return []
        return await self._constrain(functools.partial(
            self.constraints.response_format, tokenizer=tokenizer, response_format=fmt.as_request(),
            max_tokens=max_tokens, vocab_size=self._vocab_size(), thinking=thinking))

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

    def _remember(self, prep: _Prepared, reply: dict[str, Any], run: RunResult) -> None:
        conv = prep.conv
        conv.messages = conv.messages + prep.new_messages + [reply]
        conv.num_tokens = len(prep.prompt_ids) + len(run.token_ids)
        self.conversations.put(conv)

    @asynccontextmanager
    async def _turn(self, conversation_id: str | None, progress: Progress) -> AsyncIterator[None]:
        if conversation_id is not None and self.turns.busy(conversation_id):
            await progress.update(0, None, f"waiting for the previous call on {conversation_id} to finish")
        async with self.turns.hold(conversation_id):
            yield


def _tool_name(req: GenerationInput) -> str:
    if isinstance(req, ThinkInput):
        return "think"
    return "tool_call" if isinstance(req, ToolCallInput) else "chat"


def _reasoning_tokens(token_ids: list[int], think_end_id: int, eos_id: int | None) -> int:
    """Tokens before the closing `</think>` (it is not counted), or all but a final EOS when it never came."""
    if think_end_id in token_ids:
        return token_ids.index(think_end_id)
    return len(token_ids) - (1 if token_ids and token_ids[-1] == eos_id else 0)


def _usage(run: RunResult) -> Usage:
    n = len(run.token_ids)
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=n, total_tokens=run.prompt_tokens + n)


def _unknown_conversation(conversation_id: str, capacity: int) -> str:
    return (f"unknown conversation_id {conversation_id!r}: it was never issued by this server, was reset, or was "
            f"evicted (the server keeps the {capacity} most recent, within max_conversation_tokens). Omit "
            "conversation_id to start a new conversation and send the full history in `messages`")
