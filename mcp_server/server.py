"""The MCP surface: registers the tools and the models resource on an `MCPServer`; all logic is in service.py."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel

from mcp_server.model_host import ModelUnavailable
from mcp_server.progress import Progress
from mcp_server.schemas import (
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
from mcp_server.service import ChatService, GenerationFailed, RequestError
from mcp_server.transports import auth_kwargs

log = logging.getLogger(__name__)

SERVER_NAME = "deepseek-mcp"
MODELS_URI = "deepseek://models"

INSTRUCTIONS = """\
Runs a local DeepSeek-V3.1 model in this process. Use `chat` for a direct answer, `think` when the question needs \
step-by-step reasoning first, and `tool_call` to have the model choose function calls from tools you describe. \
Every result has a `conversation_id`; pass it back to continue that conversation without resending history. \
Long generations report progress and stop at the server's time limit with finish_reason "time". \
`list_models` shows what is loaded; if `model` says "random weights", the output is noise (demo checkpoint)."""

_SHARED = """
Give `prompt` (one user message) or `messages` ([{role: system|user|assistant|tool, content, tool_calls?}]), \
not both. Optional: `system`, `max_tokens`, `temperature` (0 = greedy), `top_p`, `seed`, `stop`, \
`conversation_id` (continue a conversation from an earlier result). Returns `finish_reason` (stop | length | \
time | cancelled), token `usage`, `conversation_id` and `model`."""

CHAT_DOC = ("Ask the local DeepSeek-V3.1 model and get its reply in `text` (non-thinking mode: fast, direct). "
            "`response_format` {type: 'json_schema', schema} or {type: 'json_object'} makes the reply JSON "
            "(constrained decoding), returned parsed in `parsed`." + _SHARED)
THINK_DOC = ("Ask the local DeepSeek-V3.1 model to reason before answering (thinking mode). Returns the "
             "`reasoning` and the final `answer` (also in `text`). `thinking_budget` caps reasoning tokens: at "
             "the cap the reasoning is closed and the answer follows, so keep it below `max_tokens`. `response_format` "
             "works as in `chat`: the answer after the reasoning is JSON, parsed in `parsed`." + _SHARED)
TOOL_CALL_DOC = ("Have the local DeepSeek-V3.1 model decide which of your `tools` to call. `tools`: MCP-style "
                 "{name, description, inputSchema} or OpenAI-style {type: 'function', function: {name, "
                 "description, parameters}}; `tool_choice`: 'auto' | 'required' | 'none' | {name}. Returns "
                 "`tool_calls` [{id, name, arguments}] ready to execute (arguments checked against the schema; "
                 "with 'required' or {name} decoding follows the schemas, so the calls always parse and validate), "
                 "`invalid_tool_calls` for calls that are not, and any `text`. To continue after running the "
                 "tools, pass the conversation_id with `messages` holding role 'tool' results." + _SHARED)
UNCONSTRAINED_NOTE = (" Note: this server does not constrain decoding, so 'required' and {name} are asked of the "
                      "model but not forced (check tool_calls); 'none' is enforced.")
LIST_MODELS_DOC = ("Describe the loaded model: name, architecture, parameter count, dtype, device, kernels "
                   "(triton or torch), context and KV-cache capacity in tokens, defaults, and live engine "
                   "statistics. Answers at once, also while the model is still loading (status 'loading').")
RESET_DOC = "Forget a stored conversation (by `conversation_id`) and free its memory on the server."

_ANNOTATIONS = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def _ok(out: BaseModel) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=out.model_dump_json())],
                          structured_content=out.model_dump(mode="json"))


def _error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def _tool(name: str, title: str, doc: str, input_model: type[BaseModel], output_model: type[BaseModel],
          run: Callable[[Any, Progress], Awaitable[BaseModel]]) -> Tool:
    """A tool whose input schema is `input_model` (unknown keys rejected) and output schema `output_model`."""
    arg_model = type(f"{name}Arguments", (input_model, ArgModelBase), {"__module__": __name__})

    async def handler(ctx: Context, **arguments: Any) -> CallToolResult:
        request = input_model.model_validate(arguments)
        try:
            return _ok(await run(request, Progress(ctx.report_progress)))
        except (RequestError, ModelUnavailable, GenerationFailed) as e:
            log.info("%s: %s", name, e)
            return _error(str(e))

    return Tool(fn=handler, name=name, title=title, description=doc,
                parameters=arg_model.model_json_schema(by_alias=True),
                fn_metadata=FuncMetadata(arg_model=arg_model, output_model=output_model),
                is_async=True, context_kwarg="ctx", annotations=_ANNOTATIONS)


def build_server(service: ChatService) -> MCPServer:
    async def list_models(request: ListModelsInput, progress: Progress) -> ListModelsOutput:
        return service.list_models()

    async def reset(request: ResetInput, progress: Progress) -> ResetOutput:
        return service.reset_conversation(request)

    tools = [
        _tool("chat", "Chat with DeepSeek-V3.1", CHAT_DOC, ChatInput, ChatOutput, service.chat),
        _tool("think", "Reason, then answer", THINK_DOC, ThinkInput, ThinkOutput, service.think),
        _tool("tool_call", "Choose tool calls",
              TOOL_CALL_DOC + (UNCONSTRAINED_NOTE if service.tool_call_processors is None else ""),
              ToolCallInput, ToolCallOutput, service.tool_call),
        _tool("list_models", "Loaded model", LIST_MODELS_DOC, ListModelsInput, ListModelsOutput, list_models),
        _tool("reset_conversation", "Forget a conversation", RESET_DOC, ResetInput, ResetOutput, reset),
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
