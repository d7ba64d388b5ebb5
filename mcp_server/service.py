"""The MCP tools' logic: each tool's input -> a `Plan` over its conversation -> the pipeline (pipeline.py) ->
its result model. Conversations (ids, history, one turn at a time) live here, on top of the pipeline.

Depends only on the pipeline and the engine's interfaces, never on MCP: server.py adapts these calls to the
protocol.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from deepseek_mcp.inference.text.control import THINK_END
from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.conversations import Conversation, ConversationStore, TurnLocks, UnknownConversation
from deepseek_mcp.mcp_server.engine_request import RunResult, speculative_usage
from deepseek_mcp.mcp_server.failures import RequestError
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.model_info import count_parameters, describe_model
from deepseek_mcp.mcp_server.pipeline import Choice, Pipeline, Plan, Prepared
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
    ThinkInput,
    ThinkOutput,
    ToolCallInput,
    ToolCallOut,
    ToolCallOutput,
    Usage,
)
from deepseek_mcp.mcp_server.tool_specs import BadToolSpec, check_call, check_json, normalize_choice, normalize_tools

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
class _Turn:
    """A tool call's conversation, the messages it adds, and the pipeline's answer."""

    conv: Conversation
    new_messages: list[dict[str, Any]]
    prep: Prepared
    choice: Choice


class ChatService(Pipeline):
    """The MCP front end: each tool maps its input to a `Plan` over the conversation so far, runs it through the
    pipeline, and maps the `Choice` to its result; conversations are kept here, on top of the pipeline."""

    def __init__(self, host: ModelHost, config: ServerConfig, *,
                 tool_call_processors: ToolCallProcessors | None = None) -> None:
        super().__init__(host, config, tool_call_processors=tool_call_processors)
        self.conversations: ConversationStore[Conversation] = ConversationStore(config.limits.max_conversations,
                                               config.limits.max_conversation_tokens)
        self.turns = TurnLocks()
        self._num_parameters: int | None = None

    # -- tools ----------------------------------------------------------------------------------------

    @_one_turn_at_a_time
    async def chat(self, req: ChatInput, progress: Progress) -> ChatOutput:
        fmt = self.check_response_format(req.response_format)
        turn = await self._answer(req, progress, Plan(response_format=fmt, caller="chat"))
        c = turn.choice
        value, error = check_json(c.parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(turn, {"role": "assistant", "content": c.parsed.content})
        return ChatOutput(text=c.parsed.content, finish_reason=c.run.finish_reason, usage=_usage(c.run),
                          conversation_id=turn.conv.id, model=self.host.name, steered=c.steered,
                          parsed=value, parse_error=error)

    @_one_turn_at_a_time
    async def think(self, req: ThinkInput, progress: Progress) -> ThinkOutput:
        fmt = self.check_response_format(req.response_format)
        plan = Plan(thinking=True, thinking_budget=req.thinking_budget, response_format=fmt, caller="think")
        turn = await self._answer(req, progress, plan)
        c = turn.choice
        value, error = check_json(c.parsed.content, fmt.schema_or_none()) if fmt is not None else (None, None)
        self._remember(turn, {"role": "assistant", "content": c.parsed.content})
        closed = turn.prep.tokenizer.token_to_id(THINK_END) in c.run.token_ids
        return ThinkOutput(text=c.parsed.content, answer=c.parsed.content, reasoning=c.parsed.reasoning,
                           reasoning_tokens=c.reasoning_tokens, reasoning_complete=closed,
                           finish_reason=c.run.finish_reason, usage=_usage(c.run), conversation_id=turn.conv.id,
                           model=self.host.name, steered=c.steered, parsed=value, parse_error=error)

    @_one_turn_at_a_time
    async def tool_call(self, req: ToolCallInput, progress: Progress) -> ToolCallOutput:
        try:
            specs = normalize_tools(req.tools)
            choice = normalize_choice(req.tool_choice, specs)
        except BadToolSpec as e:
            raise RequestError(str(e)) from None
        turn = await self._answer(req, progress, Plan(tools=specs, choice=choice, caller="tool_call"))
        c = turn.choice
        by_name = {s.name: s for s in specs}
        calls: list[ToolCallOut] = []
        invalid: list[InvalidToolCall] = []
        for call in c.parsed.tool_calls:
            if not call.valid:
                invalid.append(InvalidToolCall(name=call.name or None, raw=call.raw,
                                               error=call.error or "incomplete call"))
                continue
            arguments, error = check_call(call.name, call.arguments, by_name)
            if arguments is None:
                invalid.append(InvalidToolCall(name=call.name, raw=call.raw, error=error))
            else:
                calls.append(ToolCallOut(id="call_" + secrets.token_hex(8), name=call.name, arguments=arguments))
        reply: dict[str, Any] = {"role": "assistant", "content": c.parsed.content}
        if calls:
            reply["tool_calls"] = [call.model_dump() for call in calls]
        self._remember(turn, reply)
        return ToolCallOutput(text=c.parsed.content, tool_calls=calls, invalid_tool_calls=invalid,
                              finish_reason=c.run.finish_reason, usage=_usage(c.run), conversation_id=turn.conv.id,
                              model=self.host.name, steered=c.steered)

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

    # -- one turn -------------------------------------------------------------------------------------

    async def _answer(self, req: GenerationInput, progress: Progress, plan: Plan) -> _Turn:
        """The conversation so far plus this call's messages, through the pipeline (one choice)."""
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
        plan.messages = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.messages + new
        plan.max_tokens, plan.temperature, plan.top_p = req.max_tokens, req.temperature, req.top_p
        plan.seed, plan.stop = req.seed, list(req.stop or [])
        prep = await self.prepare(plan, progress)
        self.check_queue(prep)
        return _Turn(conv, new, prep, await self.run_choice(prep, 0, progress))

    def _remember(self, turn: _Turn, reply: dict[str, Any]) -> None:
        conv = turn.conv
        conv.messages = conv.messages + turn.new_messages + [reply]
        conv.num_tokens = len(turn.prep.prompt_ids) + len(turn.choice.run.token_ids)
        self.conversations.put(conv)

    @asynccontextmanager
    async def _turn(self, conversation_id: str | None, progress: Progress) -> AsyncIterator[None]:
        if conversation_id is not None and self.turns.busy(conversation_id):
            await progress.update(0, None, f"waiting for the previous call on {conversation_id} to finish")
        async with self.turns.hold(conversation_id):
            yield


def _usage(run: RunResult) -> Usage:
    n = len(run.token_ids)
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=n, total_tokens=run.prompt_tokens + n,
                 speculative=speculative_usage([run]))


def _unknown_conversation(conversation_id: str, capacity: int) -> str:
    """The error for an id this server does not hold, quoting at most 64 characters of it (an id can be a
    megabyte of the caller's text: it is not echoed whole)."""
    shown = repr(conversation_id) if len(conversation_id) <= 64 else \
        f"{conversation_id[:64]!r}... ({len(conversation_id)} characters)"
    return (f"unknown conversation_id {shown}: it was never issued by this server, was reset, or was "
            f"evicted (the server keeps the {capacity} most recent, within max_conversation_tokens). Omit "
            "conversation_id to start a new conversation and send the full history in `messages`")
