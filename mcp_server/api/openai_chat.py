"""POST /v1/chat/completions: the request as a Plan, and the ChatCompletion built from the choices.

Thinking is off by default; any one of the switches in use turns it on or off: `thinking: {"type": ...}`
(DeepSeek's), `chat_template_kwargs: {"thinking" | "enable_thinking": bool}` (vLLM / SGLang), `reasoning_effort`
(a reasoning budget of 1/8, 1/4, 1/2 or 3/4 of max_tokens for minimal, low, medium, high; "none" = off) and our
`thinking_budget`. The alias `deepseek-reasoner` thinks unless a switch says otherwise. Switches that disagree
are a 400.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from deepseek_mcp.mcp_server.api.errors import ApiError, invalid, unsupported
from deepseek_mcp.mcp_server.engine_request import with_speculative
from deepseek_mcp.mcp_server.logprobs import chat_logprobs
from deepseek_mcp.mcp_server.pipeline import Choice, Plan
from deepseek_mcp.mcp_server.schemas import NamedToolChoice
from deepseek_mcp.mcp_server.tool_specs import BadToolSpec, ToolChoice, normalize_choice, normalize_tools

EFFORT_FRACTION = {"minimal": 1 / 8, "low": 1 / 4, "medium": 1 / 2, "high": 3 / 4}
REASONER_ALIAS = "deepseek-reasoner"


def refuse_unsupported(req: Any) -> None:
    """Fields we cannot honour: a 400 naming each, never silently ignored."""
    if req.logit_bias:
        raise unsupported("logit_bias", "omit it")
    for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
        if getattr(req, name, None) is not None:
            hint = " (use tools / tool_choice)" if name.startswith("function") else ""
            raise unsupported(name, f"omit it{hint}")
    modalities = getattr(req, "modalities", None)
    if modalities is not None and list(modalities) != ["text"]:
        raise unsupported("modalities", "this model writes text only; omit modalities or give [\"text\"]")
    if getattr(req, "best_of", None) not in (None, 1):
        raise unsupported("best_of", "use n for several samples")
    if getattr(req, "echo", False):
        raise unsupported("echo", "omit it")


def thinking_of(req: Any, model: str) -> tuple[bool, float | None]:
    """(thinking on?, share of max_tokens for reasoning_effort) from the switches the request gave."""
    said: list[tuple[str, bool]] = []
    if req.thinking is not None:
        said.append(("thinking.type", req.thinking.type != "disabled"))
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise invalid(f"chat_template_kwargs.{key} must be true or false", f"chat_template_kwargs.{key}")
            said.append((f"chat_template_kwargs.{key}", kwargs[key]))
    fraction = None
    if req.reasoning_effort is not None:
        said.append(("reasoning_effort", req.reasoning_effort != "none"))
        fraction = EFFORT_FRACTION.get(req.reasoning_effort)
    if getattr(req, "thinking_budget", None) is not None:
        said.append(("thinking_budget", True))
    if len({on for _, on in said}) > 1:
        raise invalid("the thinking switches disagree: " + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in said),
                      said[0][0])
    on = said[0][1] if said else model == REASONER_ALIAS
    return on, fraction


def tool_plan(tools: list[Any] | None, choice: Any) -> tuple[list[Any], ToolChoice | None]:
    """(specs, choice) for OpenAI-style `tools` and `tool_choice`; a choice that forces a call needs tools."""
    try:
        specs = normalize_tools(list(tools or []))
    except BadToolSpec as e:
        raise invalid(str(e), "tools") from None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        try:
            choice = NamedToolChoice.model_validate(choice)
        except ValidationError:
            raise invalid("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}", "tool_choice") from None
    if not specs:
        if choice == "auto" or choice == "none":
            return [], None
        raise invalid("tool_choice forces a tool call, but no tools were given", "tool_choice")
    try:
        return specs, normalize_choice(choice, specs)
    except BadToolSpec as e:
        raise invalid(str(e), "tool_choice") from None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the template's: `developer` is a system message; `name`, `tool_call_id` and earlier
    `reasoning_content` are accepted and not rendered (V3.1 drops earlier reasoning)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, tool",
                          f"messages[{i}].role")
        msg: dict[str, Any] = {"role": role, "content": m.get("content")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    if out[-1]["role"] not in ("user", "tool"):
        raise invalid(f"the last message is a '{out[-1]['role']}' message; end messages with the turn to answer "
                      "(a user message, or tool results)", f"messages[{len(out) - 1}]")
    return out


def logprobs_of(req: Any) -> int | None:
    """`logprobs: true` (+ `top_logprobs` 0-20): per-token log-probabilities, streamed or not."""
    if req.logprobs not in (None, False, True):
        raise invalid("logprobs must be true or false", "logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if not req.logprobs:
        return None
    top = req.top_logprobs or 0
    if not 0 <= top <= 20:
        raise invalid("top_logprobs must be between 0 and 20", "top_logprobs")
    return top


def chat_plan(req: Any, model: str) -> Plan:
    refuse_unsupported(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise invalid("give max_completion_tokens or max_tokens, not two different values", "max_tokens")
    thinking, fraction = thinking_of(req, model)
    specs, choice = tool_plan(req.tools, req.tool_choice)
    fmt = req.response_format if req.response_format is not None and req.response_format.type != "text" else None
    if fmt is not None and choice is not None and choice.forces_call:
        raise invalid("response_format and a tool_choice that forces a call exclude each other", "response_format")
    return Plan(messages=template_messages(req.messages), tools=specs, choice=choice,
                parallel_tool_calls=req.parallel_tool_calls, thinking=thinking,
                thinking_budget=req.thinking_budget, thinking_fraction=fraction, response_format=fmt,
                max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop_list(),
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, n=req.n,
                logprobs=logprobs_of(req))


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = choices[0].run.prompt_tokens if choices else 0
    completion = sum(len(c.run.token_ids) for c in choices)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": choices[0].run.cached_tokens if choices else 0},
           "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)}}
    return with_speculative(out, [c.run for c in choices])


def tool_call_json(c: Choice, i: int) -> dict[str, Any]:
    call = c.calls[i]
    return {"id": c.call_ids[i], "type": "function", "function": {"name": call.name, "arguments": call.raw}}


def message(c: Choice, thinking: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.parsed.content}
    if thinking:
        msg["reasoning_content"] = msg["reasoning"] = c.parsed.reasoning
    if c.calls:
        msg["tool_calls"] = [tool_call_json(c, i) for i in range(len(c.calls))]
        msg["content"] = c.parsed.content or None
    return msg


def logprobs_json(c: Choice, tokenizer: Any) -> dict[str, Any] | None:
    return None if c.logprobs is None else chat_logprobs(c.logprobs, tokenizer)


def completion_response(plan: Plan, choices: list[Choice], model: str, response_id: str,
                        tokenizer: Any = None) -> dict[str, Any]:
    return {
        "id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": "deepseek-mcp",
        "choices": [{"index": c.index, "message": message(c, plan.thinking), "finish_reason": finish_reason(c),
                     "logprobs": logprobs_json(c, tokenizer)} for c in choices],
        "usage": usage(choices),
    }


def model_error(model: str, served: list[str]) -> ApiError:
    return ApiError(404, f"the model {model!r} does not exist here; this server serves: {', '.join(served)}",
                    param="model", code="model_not_found")


def finish_reason(c: Choice) -> str:
    """OpenAI's finish_reason: length for the token or time limit, tool_calls when calls were made, else stop."""
    if c.run.finish_reason in ("length", "time"):
        return "length"
    return "tool_calls" if c.calls else "stop"
