"""Tool definitions given to `tool_call`: normalize MCP/OpenAI shapes, check schemas, check generated calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from deepseek_mcp.inference.text.finite_json import NonFiniteNumber, loads_finite, non_finite
from deepseek_mcp.inference.text.tools import BadToolSpec, ToolSpec
from deepseek_mcp.inference.text.tools import normalize_tools as _normalize_tools
from deepseek_mcp.mcp_server.schemas import McpTool, NamedToolChoice, OpenAITool, ToolChoiceMode

__all__ = ["BadToolSpec", "ToolChoice", "ToolSpec", "check_call", "check_json", "normalize_choice", "normalize_tools"]


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode | None  # None when a tool is named
    name: str | None = None

    @property
    def forces_call(self) -> bool:
        return self.mode == "required" or self.name is not None


def normalize_tools(tools: list[McpTool | OpenAITool]) -> list[ToolSpec]:
    """The tools a client sent (MCP or OpenAI shape), names and schemas checked."""
    return _normalize_tools(tools, check_names=True, check_schemas=True)


def normalize_choice(choice: ToolChoiceMode | NamedToolChoice, specs: list[ToolSpec]) -> ToolChoice:
    if isinstance(choice, NamedToolChoice):
        names = [s.name for s in specs]
        if choice.name not in names:
            raise BadToolSpec(f"tool_choice names {choice.name!r}, which is not among the tools given "
                              f"({', '.join(names)}); name one of them or use 'auto'")
        return ToolChoice(mode=None, name=choice.name)
    return ToolChoice(mode=choice)


def check_call(name: str | None, arguments: Any, specs: dict[str, ToolSpec]) -> tuple[dict[str, Any] | None, str]:
    """Validate one generated call; returns (arguments object, "") or (None, reason it is unusable)."""
    if name is None or name not in specs:
        return None, f"unknown tool {name!r}; the tools given were {', '.join(specs)}"
    if isinstance(arguments, str):
        try:
            arguments = loads_finite(arguments)
        except json.JSONDecodeError as e:
            return None, f"arguments are not valid JSON ({e.msg} at position {e.pos})"
        except NonFiniteNumber as e:
            return None, f"arguments hold a number that is not a finite double: {e}"
    if not isinstance(arguments, dict):
        return None, f"arguments must be a JSON object, got {type(arguments).__name__}"
    bad = non_finite(arguments)
    if bad:
        return None, f"arguments hold a number that is not a finite double at {bad}"
    error = _schema_error(arguments, specs[name].parameters)
    if error:
        return None, f"arguments do not match the tool's schema at {error}"
    return arguments, ""


def check_json(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """A response_format reply: (the parsed value, None), or (None, why it is not JSON matching `schema`);
    no schema means any JSON object (json_object)."""
    try:
        value = loads_finite(text)
    except json.JSONDecodeError as e:
        return None, f"the reply is not valid JSON ({e.msg} at position {e.pos})"
    except NonFiniteNumber as e:
        return None, f"the reply holds a number that is not a finite double: {e}"
    if schema is None:
        return (value, None) if isinstance(value, dict) else (None, "the reply is JSON but not an object")
    error = _schema_error(value, schema)
    return (None, f"the reply does not match the schema at {error}") if error else (value, None)


def _schema_error(value: Any, schema: dict[str, Any]) -> str:
    """'' when `value` matches `schema`, else 'path: message' of the most relevant error."""
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    if error is None:
        return ""
    path = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"
