"""Domain logic of the tools: inputs -> prompt ids -> AsyncEngine -> parsed output -> result models.

Depends only on the engine interfaces (template, parser, sampling, logits processors, AsyncEngine via the
ModelHost), never on MCP: the server module adapts these calls to the protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from inference.engine.logits_process import ThinkingBudget
from inference.engine.sampling import SamplingParams
from inference.text.parse import StreamParser
from inference.text.template import THINK_END, render_ids
from mcp_server.config import ServerConfig
from mcp_server.constraints import GrammarConstraints, grammar_available, steered
from mcp_server.conversations import Conversation, ConversationStore, UnknownConversation
from mcp_server.generate import RunResult, run_request
from mcp_server.model_host import ModelHost
from mcp_server.processors import ToolCallProcessors, ban_tool_calls
from mcp_server.progress import Progress
from mcp_server.schemas import (
    Architecture,
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
from mcp_server.tool_specs import BadToolSpec, check_call, check_json, normalize_choice, normalize_tools

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """Input the server cannot serve; the message says what to change."""


class GenerationFailed(RuntimeError):
    """The engine failed while generating (the cause is in the message); the server goes on serving."""


@dataclass
class _Prepared:
    conv: Conversation
    new_messages: list[dict[str, Any]]
    prompt_ids: list[int]
    params: SamplingParams
    aengine: Any
    tokenizer: Any


class ChatService:
    """`constraints` (grammar-constrained decoding) is on when the configuration asks for it and xgrammar is
    installed; `tool_call_processors` is the hook tool_call takes its processors from (the constraints unless
    one is given)."""

    def __init__(self, host: ModelHost, config: ServerConfig, *,
                 tool_call_processors: ToolCallProcessors | None = None) -> None:
        self.host = host
        self.config = config
        self.conversations = ConversationStore(config.limits.max_conversations)
        self.constraints = GrammarConstraints() if config.constrained_decoding and grammar_available() else None
        self.tool_call_processors = tool_call_processors or self.constraints
        self._num_parameters: int | None = None

    # -- tools ----------------------------------------------------------------------------------------

    async def chat(self, req: ChatInput, progress: Progress) -> ChatOutput:
        fmt = self._response_format(req)
        prep = await self._prepare(req, progress, thinking=False)
        processors = await self._format_processors(prep, fmt, thinking=False)
        run, parsed = await self._run(prep, progress, thinking=False, processors=processors)
        value, error = check_json(parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(prep, {"role": "assistant", "content": parsed.content})
        return ChatOutput(text=parsed.content, finish_reason=run.finish_reason, usage=_usage(run),
                          conversation_id=prep.conv.id, model=self.host.name, steered=steered(processors),
                          parsed=value, parse_error=error)

    async def think(self, req: ThinkInput, progress: Progress) -> ThinkOutput:
        fmt = self._response_format(req)
        prep = await self._prepare(req, progress, thinking=True)
        max_tokens = prep.params.max_tokens
        if req.thinking_budget is not None:
            budget = req.thinking_budget
            if budget >= max_tokens:
                raise RequestError(f"thinking_budget {budget} leaves no room for the answer within max_tokens "
                                   f"{max_tokens}; lower thinking_budget or raise max_tokens above it")
        else:
            budget = min(self.config.limits.thinking_budget or max_tokens // 2, max_tokens - 1)
        think_end_id = prep.tokenizer.token_to_id(THINK_END)
        grammar = await self._format_processors(prep, fmt, thinking=True)
        run, parsed = await self._run(prep, progress, thinking=True,
                                      processors=[ThinkingBudget(budget, think_end_id), *grammar])
        closed = think_end_id in run.token_ids
        reasoning_tokens = run.token_ids.index(think_end_id) + 1 if closed else len(run.token_ids)
        value, error = check_json(parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(prep, {"role": "assistant", "content": parsed.content})
        return ThinkOutput(text=parsed.content, answer=parsed.content, reasoning=parsed.reasoning,
                           reasoning_tokens=reasoning_tokens, reasoning_complete=closed,
                           finish_reason=run.finish_reason, usage=_usage(run), conversation_id=prep.conv.id,
                           model=self.host.name, steered=steered(grammar), parsed=value, parse_error=error)

    async def tool_call(self, req: ToolCallInput, progress: Progress) -> ToolCallOutput:
        try:
            specs = normalize_tools(req.tools)
            choice = normalize_choice(req.tool_choice, specs)
        except BadToolSpec as e:
            raise RequestError(str(e)) from None
        prep = await self._prepare(req, progress, thinking=False, tools=[s.as_openai() for s in specs])
        processors: list[Any] = []
        if self.tool_call_processors is not None:  # GrammarConstraints bans the calls itself for "none"
            processors = await self._constrain(functools.partial(
                self.tool_call_processors, tokenizer=prep.tokenizer, tools=specs, choice=choice,
                max_tokens=prep.params.max_tokens, vocab_size=self._vocab_size()))
        elif choice.mode == "none":
            processors = [ban_tool_calls(prep.tokenizer)]
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
        self._remember(prep, reply)
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
        host, limits, sampling = self.host, self.config.limits, self.config.sampling
        info = ModelInfo(
            model=host.name, source=host.source, demo=host.demo, status=host.status, error=host.error,
            load_seconds=host.load_seconds,
            defaults={"max_tokens": limits.max_tokens, "temperature": sampling.temperature,
                      "top_p": sampling.top_p, "top_k": sampling.top_k,
                      "thinking_budget": limits.thinking_budget or "max_tokens // 2",
                      "max_wall_time_s": limits.max_wall_time_s},
        )
        engine = host.engine
        if engine is None:
            return info
        cfg = engine.config
        info.architecture = Architecture(
            model_type="deepseek_v3", num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads, vocab_size=cfg.vocab_size, q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank, n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
            first_k_dense_replace=cfg.first_k_dense_replace, max_position_embeddings=cfg.max_position_embeddings,
        )
        if self._num_parameters is None:
            counted = getattr(engine, "num_parameters", None)  # the whole model, also when split over ranks
            self._num_parameters = counted if isinstance(counted, int) else sum(
                p.numel() for p in engine.model.parameters())
        info.parameters = self._num_parameters
        info.dtype = str(engine.dtype).removeprefix("torch.") + (" (fp8 e4m3 weights)" if engine.fp8 else "")
        info.device = str(engine.device)
        if getattr(engine, "parallel_description", None):
            info.device += f"; {engine.parallel_description}"
        info.kernels = engine.backend
        if host.aengine is not None:
            info.cache_capacity_tokens = host.cache_capacity_tokens()
            info.context_tokens = host.context_tokens()
            info.stats = _jsonable(host.aengine.stats())
        return info

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
            raise RequestError(f"the last message is a '{new[-1]['role']}' message; end `messages` with the turn "
                               "to answer: a 'user' message, or 'tool' results after the assistant's tool calls")
        history = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.messages + new

        aengine = await self.host.wait_ready(progress)
        tokenizer = self.host.engine.tokenizer
        render = functools.partial(render_ids, history, tokenizer, tools=tools, thinking=thinking)
        try:
            prompt_ids = await anyio.to_thread.run_sync(render)
        except ValueError as e:
            raise RequestError(str(e)) from None
        params = self._sampling(req, len(prompt_ids))
        return _Prepared(conv, new, prompt_ids, params, aengine, tokenizer)

    def _sampling(self, req: GenerationInput, num_prompt_tokens: int) -> SamplingParams:
        context = self.host.context_tokens()
        room = context - num_prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {num_prompt_tokens} tokens but the context holds {context}; "
                               "shorten the prompt or messages, or start a new conversation (omit conversation_id)")
        if req.max_tokens is None:
            max_tokens = min(self.config.limits.max_tokens, room)
        elif req.max_tokens > room:
            raise RequestError(f"max_tokens {req.max_tokens} does not fit: the prompt takes {num_prompt_tokens} "
                               f"of the {context}-token context; use max_tokens <= {room}")
        else:
            max_tokens = req.max_tokens
        defaults = self.config.sampling
        try:
            return SamplingParams(
                temperature=defaults.temperature if req.temperature is None else req.temperature,
                top_p=defaults.top_p if req.top_p is None else req.top_p,
                top_k=defaults.top_k, seed=req.seed, max_tokens=max_tokens, stop=tuple(req.stop or ()),
            )
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None

    async def _run(self, prep: _Prepared, progress: Progress, *, thinking: bool, tools: list[str] | None = None,
                   processors: Sequence[Any] = ()) -> tuple[RunResult, Any]:
        parser = StreamParser(thinking=thinking, tools=tools)
        limits = self.config.limits
        try:
            run = await run_request(prep.aengine, prep.prompt_ids, prep.params, processors=processors,
                                    progress=progress, time_limit_s=limits.max_wall_time_s,
                                    interval_s=limits.progress_interval_s, on_text=parser.feed)
        except Exception as e:
            log.exception("generation failed")
            raise GenerationFailed(f"generation failed: {type(e).__name__}: {e}") from e
        parser.finish()
        return run, parser.result()

    def _response_format(self, req: ChatInput) -> ResponseFormat | None:
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if self.constraints is None:
            raise RequestError("response_format needs constrained decoding, which this server runs without "
                               "(constrained_decoding is off, or xgrammar is not installed on this platform); "
                               "omit response_format or enable it")
        return fmt

    async def _format_processors(self, prep: _Prepared, fmt: ResponseFormat | None, *, thinking: bool) -> list[Any]:
        if fmt is None or self.constraints is None:
            return []
        return await self._constrain(functools.partial(
            self.constraints.response_format, tokenizer=prep.tokenizer, response_format=fmt.as_request(),
            max_tokens=prep.params.max_tokens, vocab_size=self._vocab_size(), thinking=thinking))

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

    def _remember(self, prep: _Prepared, reply: dict[str, Any]) -> None:
        conv = prep.conv
        conv.messages = conv.messages + prep.new_messages + [reply]
        self.conversations.put(conv)


def _usage(run: RunResult) -> Usage:
    n = len(run.token_ids)
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=n, total_tokens=run.prompt_tokens + n)


def _unknown_conversation(conversation_id: str, capacity: int) -> str:
    return (f"unknown conversation_id {conversation_id!r}: it was never issued by this server, was reset, or was "
            f"evicted (the server keeps the {capacity} most recent). Omit conversation_id to start a new conversation "
            "and send the full history in `messages`")


def _jsonable(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        stats = dataclasses.asdict(stats)
    elif hasattr(stats, "model_dump"):
        stats = stats.model_dump()
    elif not isinstance(stats, dict):
        stats = dict(vars(stats))
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None), list, dict))}
