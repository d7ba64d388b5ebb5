"""Tool definitions given to `tool_call`: normalize MCP/OpenAI shapes, check schemas, check generated calls."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from mcp_server.schemas import McpTool, NamedToolChoice, OpenAITool, ToolChoiceMode

# A name the chat template can carry verbatim between <｜tool▁call▁begin｜> and <｜tool▁sep｜>.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")


class BadToolSpec(ValueError):
    pass


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode | None  # None when a tool is named
    name: str | None = None

    @property
    def forces_call(self) -> bool:
        return self.mode == "required" or self.name is not None


def normalize_tools(tools: list[McpTool | OpenAITool]) -> list[ToolSpec]:
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if isinstance(tool, OpenAITool):
            name, desc, schema = tool.function.name, tool.function.description, tool.function.parameters
        else:
            name, desc, schema = tool.name, tool.description, tool.input_schema
        where = f"tools[{i}] ({name!r})"
        if not _NAME.match(name):
            raise BadToolSpec(
                f"{where}: tool names must be 1-128 characters of letters, digits, '_', '-', '.', ':' or '/', "
                "starting with a letter, digit or '_'; rename the tool"
            )
        if name in seen:
            raise BadToolSpec(f"{where}: duplicate tool name; give each tool a unique name")
        seen.add(name)
        check_schema(schema, where)
        specs.append(ToolSpec(name=name, description=desc or "", parameters=schema))
    return specs


def check_schema(schema: dict[str, Any], where: str) -> None:
    if schema.get("type", "object") != "object":
        raise BadToolSpec(f"{where}: the input schema must describe an object (\"type\": \"object\"), "
                          f"got type {schema.get('type')!r}")
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        path = "/".join(str(p) for p in e.path) or "(root)"
        raise BadToolSpec(f"{where}: the input schema is not valid JSON Schema at {path}: {e.message}") from None


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
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return None, f"arguments are not valid JSON ({e.msg} at position {e.pos})"
    if not isinstance(arguments, dict):
        return None, f"arguments must be a JSON object, got {type(arguments).__name__}"
    error = _schema_error(arguments, specs[name].parameters)
    if error:
        return None, f"arguments do not match the tool's schema at {error}"
    return arguments, ""


def check_json(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """A response_format reply: (the parsed value, None), or (None, why it is not JSON matching `schema`);
    no schema means any JSON object (json_object)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"the reply is not valid JSON ({e.msg} at position {e.pos})"
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
