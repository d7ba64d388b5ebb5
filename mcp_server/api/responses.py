"""POST /v1/responses: the request (and the stored conversation it continues) as a Plan; the Response object and
its output items built from the choice.

Input items become template messages: `message` (roles user, assistant, system, developer = system; text parts
`input_text` / `output_text` / `text`), `function_call` / `custom_tool_call` (the assistant's calls, merged into
the assistant turn before them), `function_call_output` / `custom_tool_call_output` (tool messages); earlier
`reasoning` items are accepted and dropped (V3.1 drops earlier reasoning). `instructions` is the system prompt
of this request only (not carried to a continuation, as OpenAI). Function tools are the project's tool specs;
a custom tool's input is raw text, constrained to its lark or regex grammar (`ToolSpec.grammar`); hosted tools
(web_search, file_search, ...) are not ours to run and are left out of the prompt. `reasoning.effort` is the
reasoning budget as on chat completions (a share of max_output_tokens; "none" = off; without an effort the
model's default: deepseek-reasoner thinks). Reasoning comes back as a `reasoning` item whose content is the
reasoning text; with `reasoning.summary` its summary is the same text (we have no summarizer).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from deepseek_mcp.inference.text.tools import EMPTY_PARAMETERS
from deepseek_mcp.mcp_server.api.errors import ApiError, invalid, unsupported
from deepseek_mcp.mcp_server.api.openai_chat import EFFORT_FRACTION, REASONER_ALIAS
from deepseek_mcp.mcp_server.engine_request import with_speculative
from deepseek_mcp.mcp_server.pipeline import Choice, Plan
from deepseek_mcp.mcp_server.schemas import NamedToolChoice, ResponseFormat
from deepseek_mcp.mcp_server.tool_specs import BadToolSpec, ToolChoice, ToolSpec, normalize_choice, normalize_tools

log = logging.getLogger(__name__)

FRACTIONS = {**EFFORT_FRACTION, "xhigh": 7 / 8, "max": 7 / 8}
TEXT_PARTS = ("input_text", "output_text", "text")
ANY_TEXT = r"[\s\S]*"  # a custom tool with the "text" format: any raw text


class _Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionTool(_Tool):
    type: str
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls are constrained to the schema either way


class CustomFormat(_Tool):
    type: str
    syntax: str | None = None
    definition: str | None = None


class CustomTool(_Tool):
    type: str
    name: str
    description: str | None = None
    format: CustomFormat | None = None


@dataclass
class Tools:
    specs: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice | None = None
    custom: set[str] = field(default_factory=set)  # names of the custom tools (their calls: custom_tool_call)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# -- request -> Plan ----------------------------------------------------------------------------------------


def refuse_unsupported(req: Any) -> None:
    for name, why in (("background", "responses run in the foreground; omit it"),
                      ("conversation", "use previous_response_id to continue a stored response"),
                      ("prompt", "reusable prompt templates live on OpenAI's platform; send input and instructions"),
                      ("max_tool_calls", "omit it (parallel_tool_calls: false allows one call)"),
                      ("top_logprobs", "omit it"),
                      ("context_management", "omit it")):
        value = getattr(req, name)
        if value is not None and value is not False:
            raise unsupported(name, why)
    if req.truncation == "auto":
        raise unsupported("truncation", "'auto' would drop input items; only 'disabled' is served (an input "
                                        "past the context is a 400)")


def thinking_of(req: Any, model: str) -> tuple[bool, float | None]:
    effort = req.reasoning.effort if req.reasoning is not None else None
    if effort is None:
        return model == REASONER_ALIAS, None
    if effort == "none":
        return False, None
    return True, FRACTIONS[effort]


def _text(content: Any, where: str, key: str = "content") -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.{key} must be a string or a list of text parts", f"{where}.{key}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise invalid(f"{where}.{key}[{j}]: part type {kind!r} is not supported (this model reads text: "
                          "input_text, output_text)", f"{where}.{key}[{j}].type")
        parts.append(part["text"])
    return "".join(parts)


def _str_field(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as items (a string is one user message), each with an id (kept when given)."""
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}] \
        if isinstance(value, str) else [dict(i) for i in value]
    for item in items:
        kind = item.get("type", "message")
        item.setdefault("type", kind)
        item.setdefault("id", new_id({"message": "msg", "function_call": "fc", "reasoning": "rs"}.get(kind, "item")))
    return items


def template_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items -> template messages (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise invalid(f"{where}.role {item.get('role')!r} is not one of user, assistant, system, "
                              "developer", f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind in ("function_call", "custom_tool_call"):
            args = _str_field(item, "arguments" if kind == "function_call" else "input", where)
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": _str_field(item, "name", where), "arguments": args}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append({"role": "tool", "content": _text(item.get("output"), where, "output")})
        elif kind != "reasoning":
            raise invalid(f"{where}: input item type {kind!r} is not supported (this server reads message, "
                          "function_call, function_call_output, custom_tool_call, custom_tool_call_output and "
                          "reasoning items)", f"{where}.type")
    return out


def tool_plan(tools: list[dict[str, Any]] | None, choice: Any) -> Tools:
    """Function and custom tools as specs (hosted tools left out), and the tool_choice over them."""
    specs, custom = [], set()
    for i, t in enumerate(tools or []):
        where = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        try:
            if kind == "function":
                f = FunctionTool.model_validate(t)
                specs.append(ToolSpec(f.name, f.description or "", f.parameters or dict(EMPTY_PARAMETERS)))
            elif kind == "custom":
                c = CustomTool.model_validate(t)
                specs.append(_custom_spec(c, where))
                custom.add(c.name)
            elif isinstance(kind, str):
                log.info("leaving out hosted tool %s: not one this server runs", kind)
            else:
                raise invalid(f"{where}: a tool needs a type (function, custom, or a hosted tool)", f"{where}.type")
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise invalid(f"{where}.{loc}: {msg}", f"{where}.{loc}") from None
    try:
        specs = normalize_tools(specs)  # type: ignore[arg-type]
    except BadToolSpec as e:
        raise invalid(str(e), "tools") from None
    mode: Any = choice or "auto"
    if isinstance(mode, dict):
        kind = mode.get("type")
        if kind not in ("function", "custom") or not isinstance(mode.get("name"), str):
            raise unsupported("tool_choice", f"type {kind!r}: give 'auto', 'none', 'required' or {{\"type\": "
                                             "\"function\" | \"custom\", \"name\": ...}")
        if (mode["name"] in custom) != (kind == "custom"):
            raise invalid(f"tool_choice names {mode['name']!r} as a {kind} tool, but no {kind} tool of that name "
                          "was given", "tool_choice")
        mode = NamedToolChoice(name=mode["name"])
    if not specs:
        if mode in ("auto", "none"):
            return Tools()
        raise invalid("tool_choice forces a tool call, but no function or custom tools were given", "tool_choice")
    try:
        return Tools(specs, normalize_choice(mode, specs), custom)
    except BadToolSpec as e:
        raise invalid(str(e), "tool_choice") from None


def _custom_spec(c: CustomTool, where: str) -> ToolSpec:
    fmt = c.format or CustomFormat(type="text")
    if fmt.type == "text":
        grammar, note = ("regex", ANY_TEXT), "free-form text"
    elif fmt.type == "grammar":
        if fmt.syntax not in ("lark", "regex") or not fmt.definition:
            raise invalid(f"{where}.format: a grammar format needs syntax 'lark' or 'regex' and a definition",
                          f"{where}.format")
        grammar = (fmt.syntax, fmt.definition)
        note = f"raw text matching this {fmt.syntax} grammar:\n{fmt.definition}"
    else:
        raise unsupported(f"{where}.format.type", f"{fmt.type!r}; custom tool formats are 'text' and 'grammar'")
    description = (c.description or "").rstrip()
    description += ("\n\n" if description else "") + f"This tool takes its input as {note}\n(not JSON)"
    return ToolSpec(c.name, description, dict(EMPTY_PARAMETERS), grammar=grammar)


def response_format(req: Any) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema_ is None:
        raise invalid("text.format of type json_schema needs a schema", "text.format.schema")
    return ResponseFormat(type="json_schema", schema=fmt.schema_)


def responses_plan(req: Any, model: str, history: list[dict[str, Any]], new: list[dict[str, Any]],
                   tools: Tools) -> Plan:
    """`history`: the stored conversation continued (template messages), `new`: this request's input."""
    refuse_unsupported(req)
    thinking, fraction = thinking_of(req, model)
    fmt = response_format(req)
    if fmt is not None and tools.choice is not None and tools.choice.forces_call:
        raise invalid("text.format and a tool_choice that forces a call exclude each other", "text.format")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history + new
    if not new:
        raise invalid("input is empty; give a string or at least one input item", "input")
    if messages[-1]["role"] not in ("user", "tool"):
        raise invalid(f"the last input item is a '{messages[-1]['role']}' message; end input with the turn to "
                      "answer (a user message, or function_call_output items)", "input")
    return Plan(messages=messages, tools=tools.specs, choice=tools.choice,
                parallel_tool_calls=req.parallel_tool_calls is not False, thinking=thinking,
                thinking_fraction=fraction, response_format=fmt, max_tokens=req.max_output_tokens,
                temperature=req.temperature, top_p=req.top_p, caller="responses")


# -- Choice -> Response ---------------------------------------------------------------------------------------


def echo(req: Any, model: str, tools: Tools) -> dict[str, Any]:
    """The request's settings, as every Response object repeats them."""
    reasoning = req.reasoning
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    choice = req.tool_choice or "auto"
    return {"model": model, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": reasoning.effort if reasoning else None,
                          "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None},
            "store": req.store is not False, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": choice, "tools": list(req.tools or []),
            "truncation": "disabled", "user": req.user, "service_tier": "default", "background": False,
            "prompt_cache_key": req.prompt_cache_key, "safety_identifier": req.safety_identifier}


def response_object(rid: str, created: int, settings: dict[str, Any], status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, error: ApiError | None = None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "error": None if error is None else {"code": error.code or "server_error", "message": error.message},
            "incomplete_details": incomplete, **settings, "output": output, "usage": usage,
            "completed_at": int(time.time()) if status == "completed" else None}


def status_of(c: Choice) -> str:
    """`incomplete` when max_output_tokens or the wall-time limit ended the output (as `length` does on chat
    completions), else `completed`."""
    return "incomplete" if c.run.finish_reason in ("length", "time", "cancelled") else "completed"


def usage(c: Choice) -> dict[str, Any]:
    out = len(c.run.token_ids)
    return with_speculative({"input_tokens": c.run.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": c.run.cached_tokens}, "output_tokens": out,
                             "output_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
                             "total_tokens": c.run.prompt_tokens + out}, [c.run])


def reasoning_item(item_id: str, text: str, summary: bool, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "status": status, "encrypted_content": None,
            "summary": [{"type": "summary_text", "text": text}] if summary else [],
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call_id: str, name: str, raw: str, custom: bool,
              status: str = "completed") -> dict[str, Any]:
    if custom:
        return {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": raw,
                "status": status}
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": raw,
            "status": status}


def output_items(plan: Plan, c: Choice, tools: Tools, summary: bool) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if plan.thinking and c.parsed.reasoning:
        items.append(reasoning_item(new_id("rs"), c.parsed.reasoning, summary))
    if c.parsed.content:
        items.append(message_item(new_id("msg"), c.parsed.content))
    for call, call_id in zip(c.calls, c.call_ids, strict=True):
        items.append(call_item(new_id("ctc" if call.name in tools.custom else "fc"), call_id, call.name, call.raw,
                               call.name in tools.custom))
    if items and status_of(c) == "incomplete":
        items[-1]["status"] = "incomplete"
    return items


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The response's output as the template's assistant turn, for a continuation (reasoning dropped)."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {
        "name": it["name"], "arguments": it["arguments"] if it["type"] == "function_call" else it["input"]}}
        for it in output if it["type"] in ("function_call", "custom_tool_call")]
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    return msg


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
