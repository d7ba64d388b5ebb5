"""POST /v1/messages (and count_tokens): Anthropic requests as a Plan; the Message built from the choice.

History: `tool_use` blocks become the assistant's tool calls (input written as compact JSON), `tool_result`
blocks become tool messages (an `is_error` result is prefixed "Error: "), earlier `thinking` blocks are accepted
and dropped (V3.1 drops earlier reasoning). Server tools (`web_search_...`, no input_schema) are not ours to
run and are left out of the prompt. `thinking: {"type": "enabled", "budget_tokens": N}` is the reasoning
budget (below max_tokens); input_tokens counts the prompt tokens not served from the prefix cache, as
Anthropic's do, with the rest in cache_read_input_tokens.

Prefill: messages ending with an assistant message (text only; not with thinking enabled, as Anthropic
refuses it too) render that turn open (the template's `prefix` turn without its end of sentence), and the
response continues its text: the prefilled text is not repeated in the response.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from deepseek_mcp.inference.text.parse import ToolCall
from deepseek_mcp.mcp_server.api.errors import invalid
from deepseek_mcp.mcp_server.engine_request import with_speculative
from deepseek_mcp.mcp_server.pipeline import Choice, Plan
from deepseek_mcp.mcp_server.schemas import McpTool, NamedToolChoice
from deepseek_mcp.mcp_server.tool_specs import BadToolSpec, ToolChoice, normalize_choice, normalize_tools

log = logging.getLogger(__name__)


def _text_of(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for j, b in enumerate(blocks or []):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise invalid(f"{where}[{j}]: only text blocks are supported here, got {kind!r}", f"{where}[{j}]")
        parts.append(b["text"])
    return "".join(parts)


def template_messages(req: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            out.append(_assistant(i, blocks))
        elif m.role == "system":  # V3.1's template gathers every system text into the prompt's head, in order
            out.append({"role": "system", "content": _system(i, blocks)})
        else:
            out.extend(_user(i, blocks))
    if out and out[-1]["role"] == "assistant":  # prefill: the response continues this text
        where = f"messages.{len(req.messages) - 1}"
        if req.thinking is not None and req.thinking.type != "disabled":
            raise invalid("a final assistant message (prefill) cannot be continued with thinking enabled (as "
                          "with Anthropic's API); disable thinking or end messages with a user turn", where)
        if out[-1].get("tool_calls"):
            raise invalid("the final assistant message (prefill) may hold only text: a tool_use needs its "
                          "tool_result in a user message after it", where)
        out[-1]["prefix"] = True
    return out


def is_prefill(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and messages[-1]["role"] == "assistant"


def _assistant(i: int, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    text, calls = [], []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "tool_use":
            if not isinstance(b.get("name"), str):
                raise invalid(f"messages.{i}.content.{j}: tool_use needs a name", f"messages.{i}.content.{j}.name")
            calls.append({"id": b.get("id"), "type": "function", "function": {
                "name": b["name"], "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False,
                                                           separators=(",", ":"))}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise invalid(f"messages.{i}.content.{j}: unsupported block type {kind!r} in an assistant message",
                          f"messages.{i}.content.{j}.type")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _system(i: int, blocks: list[dict[str, Any]]) -> str:
    for j, b in enumerate(blocks):
        if b.get("type") != "text":
            raise invalid(f"messages.{i}.content.{j}: a system message holds text blocks only, not "
                          f"{b.get('type')!r}", f"messages.{i}.content.{j}.type")
    return "".join(str(b.get("text", "")) for b in blocks)


def _user(i: int, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    text: list[str] = []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "tool_result":
            if text:
                out.append({"role": "user", "content": "".join(text)})
                text = []
            content = _text_of(b.get("content") or "", f"messages.{i}.content.{j}.content")
            out.append({"role": "tool", "content": ("Error: " + content) if b.get("is_error") else content})
        else:
            raise invalid(f"messages.{i}.content.{j}: unsupported block type {kind!r} (this model reads text, "
                          "tool_use and tool_result blocks)", f"messages.{i}.content.{j}.type")
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def tool_plan(req: Any) -> tuple[list[Any], ToolChoice | None, bool]:
    tools = []
    for t in req.tools or []:
        if t.input_schema is None and t.type not in (None, "custom"):
            log.info("leaving out server tool %s (%s): not one this server runs", t.name, t.type)
            continue
        tools.append(McpTool.model_validate({"name": t.name, "description": t.description,
                                             "inputSchema": t.input_schema or {"type": "object", "properties": {}}}))
    try:
        specs = normalize_tools(tools)
    except BadToolSpec as e:
        raise invalid(str(e), "tools") from None
    tc = req.tool_choice
    mode = tc.type if tc is not None else "auto"
    parallel = not (tc is not None and tc.disable_parallel_tool_use)
    if not specs:
        if mode in ("auto", "none"):
            return [], None, parallel
        raise invalid(f"tool_choice {mode!r} forces a tool call, but no tools were given", "tool_choice")
    if mode == "tool":
        if not tc or not tc.name:
            raise invalid("tool_choice type 'tool' needs the tool's name", "tool_choice.name")
        choice_in: Any = NamedToolChoice(name=tc.name)
    else:
        choice_in = {"any": "required"}.get(mode, mode)
    try:
        return specs, normalize_choice(choice_in, specs), parallel
    except BadToolSpec as e:
        raise invalid(str(e), "tool_choice") from None


def thinking_of(req: Any, max_tokens: int | None) -> tuple[bool, int | None]:
    t = req.thinking
    if t is None or t.type == "disabled":
        return False, None
    budget = t.budget_tokens
    if budget is not None and max_tokens is not None and budget >= max_tokens:
        raise invalid(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens}), which also "
                      "holds the answer", "thinking.budget_tokens")
    return True, budget


def messages_plan(req: Any) -> Plan:
    specs, choice, parallel = tool_plan(req)
    thinking, budget = thinking_of(req, req.max_tokens)
    messages = template_messages(req)
    return Plan(messages=messages, continue_final=is_prefill(messages), tools=specs, choice=choice,
                parallel_tool_calls=parallel, thinking=thinking, thinking_budget=budget, max_tokens=req.max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=list(req.stop_sequences or []))


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A tool_use block's `input`: the call's arguments when they are a JSON object, else `{}` (malformed or
    cut-off arguments, possible only without constrained decoding or when the time limit cuts a call; the
    shape has no place for raw text, so the client's schema check reports the missing fields). The stream
    sends the same object, whole, when the call closes."""
    return call.arguments if isinstance(call.arguments, dict) else {}


def input_json(call: ToolCall) -> str:
    return json.dumps(tool_input(call), ensure_ascii=False, separators=(",", ":"))


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def signature(reasoning: str) -> str:
    """An opaque, stable `signature` for a thinking block (Anthropic clients send it back; we ignore it)."""
    return "dsmcp-" + hashlib.sha256(reasoning.encode()).hexdigest()[:48]


def stop_reason(c: Choice) -> str:
    if c.calls:
        return "tool_use"
    if c.run.finish_reason in ("length", "time"):
        return "max_tokens"
    return "stop_sequence" if c.stop_sequence is not None else "end_turn"


def usage(c: Choice) -> dict[str, Any]:
    cached = c.run.cached_tokens
    return with_speculative({"input_tokens": c.run.prompt_tokens - cached, "output_tokens": len(c.run.token_ids),
                             "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}, [c.run])


def message_response(plan: Plan, c: Choice, model: str, message_id: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if plan.thinking and c.parsed.reasoning:
        content.append({"type": "thinking", "thinking": c.parsed.reasoning,
                        "signature": signature(c.parsed.reasoning)})
    if c.parsed.content:
        content.append({"type": "text", "text": c.parsed.content})
    for call, call_id in zip(c.calls, c.call_ids, strict=True):
        content.append({"type": "tool_use", "id": tool_use_id(call_id), "name": call.name,
                        "input": tool_input(call)})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(c), "stop_sequence": c.stop_sequence, "usage": usage(c)}
