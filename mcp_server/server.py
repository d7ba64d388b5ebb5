"""The MCP surface: registers the tools and the models resource on an `MCPServer`; all logic is in service.py."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ValidationError

from deepseek_mcp.mcp_server.errors import readable_errors
from deepseek_mcp.mcp_server.failures import GenerationFailed, RequestError
from deepseek_mcp.mcp_server.json_schema import input_schema, output_schema
from deepseek_mcp.mcp_server.metrics import Metrics
from deepseek_mcp.mcp_server.model_host import ModelUnavailable
from deepseek_mcp.mcp_server.progress import Progress
from deepseek_mcp.mcp_server.schemas import (
    ChatInput,
    ChatOutput,
    ListModelsInput,
    ListModelsOutput,
    ResetInput,
    ResetOutput,
    ThinkInput,
    ThinkOutput,
    ToolCallInput,
    ToolCallOutput,
)
from deepseek_mcp.mcp_server.service import ChatService
from deepseek_mcp.mcp_server.shutdown import SHUTTING_DOWN, Drain
from deepseek_mcp.mcp_server.transports import auth_kwargs

log = logging.getLogger(__name__)

SERVER_NAME = "deepseek-mcp"
MODELS_URI = "deepseek://models"

INSTRUCTIONS = """\
Runs a local DeepSeek-V3.1 model in this process. Use `chat` for a direct answer, `think` when the question needs \
step-by-step reasoning first, and `tool_call` to have the model choose function calls from tools you describe. \
Every result has a `conversation_id`; pass it back to continue that conversation without resending history. \
Long generations report progress and stop at the server's time limit with finish_reason "time". \
`list_models` shows what is loaded; if `model` says "random weights", the output is noise (demo checkpoint)."""

_JSON = " `response_format` makes the {what} JSON (constrained decoding)."


def tool_docs(*, json_output: bool, forced_calls: bool) -> dict[str, str]:
    """Tool descriptions that promise only what this server does: `json_output` when response_format is
    served, `forced_calls` when tool_call's decoding is constrained."""
    chat = "Ask the local DeepSeek-V3.1; the reply is in `text` (no reasoning)."
    think = "Ask the local DeepSeek-V3.1 to reason, then answer; `thinking_budget` caps the reasoning."
    tool_call = "Have the local DeepSeek-V3.1 choose calls among your `tools`: `tool_calls` [{id, name, arguments}]"
    if json_output:
        chat += _JSON.replace("{what}", "reply")
        think += _JSON.replace("{what}", "answer")
    tool_call += ("; with tool_choice required or {name} they always parse and match the schema" if forced_calls else
                  UNCONSTRAINED_NOTE)
    tool_call += ". To continue, send role 'tool' results with the conversation_id."
    return {"chat": chat, "think": think, "tool_call": tool_call}


UNCONSTRAINED_NOTE = " (this server does not constrain decoding: required and {name} are asked, not forced)"
LIST_MODELS_DOC = ("The loaded model: architecture, dtype, device, kernels, context and cache tokens, defaults, "
                   "engine stats; also while loading.")
RESET_DOC = "Forget a stored conversation and free its memory."

# Generation tools store the conversation (server state, not the world): not read-only, not destructive.
_GENERATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_READS = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_DELETES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)


def _ok(out: BaseModel) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=out.model_dump_json())],
                          structured_content=out.model_dump(mode="json"))


def _error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


class _RawArguments(FuncMetadata):
    """Hands the handler the arguments as sent; it validates them itself, so a mistake reads as one line per
    problem rather than pydantic's report."""

    def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
        # pre_parse_json: as the SDK does, accept a list or object sent as a JSON string (Claude Desktop does)
        return {"arguments": self.pre_parse_json(dict(arguments_to_validate))}


def _tool(name: str, title: str, doc: str, input_model: type[BaseModel], output_model: type[BaseModel],
          run: Callable[[Any, Progress], Awaitable[BaseModel]], annotations: ToolAnnotations, *,
          omit: frozenset[str] = frozenset(), metrics: Metrics | None = None, drain: Drain | None = None) -> Tool:
    """A tool whose input schema is `input_model` (unknown keys rejected) and output schema `output_model`;
    each call counted in `metrics` by its outcome; a call still running when the server stops (`drain`) ends
    with an error result that says so."""
    arg_model = type(f"{name}Arguments", (input_model, ArgModelBase), {"__module__": __name__})

    async def handler(ctx: Context, arguments: dict[str, Any]) -> CallToolResult:
        result = await call(ctx, arguments)
        if metrics is not None:
            metrics.observe_tool_call(name, not result.is_error)
        return result

    async def call(ctx: Context, arguments: dict[str, Any]) -> CallToolResult:
        try:
            request = input_model.model_validate(arguments)
        except ValidationError as e:
            message = readable_errors(e, arguments, input_model, f"arguments for {name}")
            log.info("%s: %s", name, message.replace("\n", " "))
            return _error(message)
        try:
            if drain is None:
                return _ok(await run(request, Progress(ctx.report_progress)))
            if drain.draining:  # over HTTP the stop refuses the request itself; over stdio, here
                return _error(SHUTTING_DOWN)
            with drain.guard(f"{name} (MCP tool call)"):
                return _ok(await run(request, Progress(ctx.report_progress)))
            return _error(SHUTTING_DOWN)  # reached only when the stop cancelled the call
        except (RequestError, ModelUnavailable, GenerationFailed) as e:
            log.info("%s: %s", name, e)
            return _error(str(e))

    metadata = _RawArguments(arg_model=arg_model, output_model=output_model, output_schema=output_schema(output_model))
    return Tool(fn=handler, name=name, title=title, description=doc, parameters=input_schema(input_model, omit=omit),
                fn_metadata=metadata, is_async=True, context_kwarg="ctx", annotations=annotations)


def build_server(service: ChatService, drain: Drain | None = None) -> MCPServer:
    """The MCP server over `service`; `drain`: the server's graceful stop, which ends tool calls under way."""
    async def list_models(request: ListModelsInput, progress: Progress) -> ListModelsOutput:
        return service.list_models()

    async def reset(request: ResetInput, progress: Progress) -> ResetOutput:
        async with service.turns.hold(request.conversation_id):  # after the turns already under way
            return service.reset_conversation(request)

    docs = tool_docs(json_output=service.constraints is not None,
                     forced_calls=service.tool_call_processors is not None)
    # without constraints response_format is refused, so it is not advertised (a call that sends it is told why)
    omit = frozenset() if service.constraints is not None else frozenset({"response_format"})
    tool = functools.partial(_tool, metrics=service.metrics, drain=drain)
    tools = [
        tool("chat", "Chat with DeepSeek-V3.1", docs["chat"], ChatInput, ChatOutput, service.chat, _GENERATES,
             omit=omit),
        tool("think", "Reason, then answer", docs["think"], ThinkInput, ThinkOutput, service.think, _GENERATES,
             omit=omit),
        tool("tool_call", "Choose tool calls", docs["tool_call"], ToolCallInput, ToolCallOutput, service.tool_call,
             _GENERATES),
        tool("list_models", "Loaded model", LIST_MODELS_DOC, ListModelsInput, ListModelsOutput, list_models,
             _READS),
        tool("reset_conversation", "Forget a conversation", RESET_DOC, ResetInput, ResetOutput, reset, _DELETES),
    ]
    from importlib.metadata import PackageNotFoundError, version

    try:
        server_version = version("deepseek-mcp")
    except PackageNotFoundError:
        server_version = "0"
    mcp = MCPServer(SERVER_NAME, title="DeepSeek-V3.1 (local)", instructions=INSTRUCTIONS, version=server_version,
                    tools=tools, log_level=service.config.log_level, **auth_kwargs(service.config))

    @mcp.resource(MODELS_URI, name="models", title="Loaded model", mime_type="application/json",
                  description=LIST_MODELS_DOC)
    def models_resource() -> str:
        return service.list_models().model_dump_json(indent=2)

    return mcp
