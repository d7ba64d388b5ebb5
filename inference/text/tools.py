"""Tool definitions, one type for the whole project: the chat template renders them, the grammars constrain
calls to them, the MCP and HTTP boundaries normalize what clients send into them.

Accepted shapes: MCP (`{name, description, inputSchema}`), OpenAI (`{type: "function", function: {name,
description, parameters}}`), plain `{name, parameters}`, pydantic models of those (dumped by alias), and
`ToolSpec` itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from deepseek_mcp.inference.text.json_depth import schema_depth_error

# A name the chat template can carry verbatim between <｜tool▁call▁begin｜> and <｜tool▁sep｜>.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
EMPTY_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}


class BadToolSpec(ValueError):
    """A tool list that cannot be used; the message names the tool and the fix."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: Any  # JSON Schema of the arguments object
    # A custom tool (OpenAI Responses): its input is raw text in this grammar, not JSON; (syntax, definition)
    # with syntax "lark" or "regex" (the constrained decoding compiles it). None: JSON arguments.
    grammar: tuple[str, str] | None = None

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def normalize_tools(tools: Sequence[Any] | None, *, check_names: bool = False,
                    check_schemas: bool = False) -> list[ToolSpec]:
    """Tool specs in any accepted shape -> `ToolSpec`s (None or [] -> no tools); duplicate names raise.
    `check_names`: names must match TOOL_NAME; `check_schemas`: parameters must be valid JSON Schema of an
    object. Raises BadToolSpec naming `tools[i]`."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise BadToolSpec(f"tools must be a list of tool specs, got {type(tools).__name__}")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        spec = tool if isinstance(tool, ToolSpec) else _tool_spec(i, tool)
        where = f"tools[{i}] ({spec.name!r})"
        if check_names and not TOOL_NAME.match(spec.name):
            raise BadToolSpec(f"{where}: a tool name must be 1-128 letters, digits or _ . : / - (starting with a "
                              "letter, digit or _); rename the tool")
        if spec.name in seen:
            raise BadToolSpec(f"tools[{i}]: duplicate tool name {spec.name!r}; tool names must be unique")
        seen.add(spec.name)
        if check_schemas:
            kind = spec.parameters.get("type", "object")
            if kind != "object":
                raise BadToolSpec(f"{where}: the input schema must describe an object (\"type\": \"object\"), "
                                  f"got type {kind!r}")
            too_deep = schema_depth_error(spec.parameters, where)
            if too_deep:
                raise BadToolSpec(too_deep)
            error = schema_error(spec.parameters)
            if error:
                raise BadToolSpec(f"{where}: the input schema is not valid JSON Schema at {error}")
        specs.append(spec)
    return specs


def schema_error(schema: Mapping[str, Any]) -> str | None:
    """None for a valid JSON Schema (draft 2020-12 unless `$schema` says otherwise), else 'path: message'."""
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        return f"{'/'.join(str(p) for p in e.path) or '(root)'}: {e.message}"
    return None


def _tool_spec(index: int, tool: Any) -> ToolSpec:
    if hasattr(tool, "model_dump") and not isinstance(tool, Mapping):
        tool = tool.model_dump(by_alias=True, exclude_none=True)  # pydantic: mcp.types.Tool, our input models
    if not isinstance(tool, Mapping):
        raise BadToolSpec(f"tools[{index}]: expected an object, got {type(tool).__name__}")
    if "function" in tool:  # OpenAI: {"type": "function", "function": {name, description, parameters}}
        if tool.get("type", "function") != "function":
            raise BadToolSpec(f"tools[{index}]: unsupported tool type {tool.get('type')!r}; expected 'function'")
        spec = tool["function"]
        if not isinstance(spec, Mapping):
            raise BadToolSpec(f"tools[{index}]: 'function' must be an object with 'name', 'parameters'")
        schema_keys: tuple[str, ...] = ("parameters",)
    else:  # MCP: {name, description, inputSchema}
        spec = tool
        schema_keys = ("inputSchema", "input_schema", "parameters")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise BadToolSpec(f"tools[{index}]: missing 'name'; give {{'name', 'description', 'inputSchema'}} "
                          "(MCP) or {'type': 'function', 'function': {'name', 'description', 'parameters'}}")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise BadToolSpec(f"tools[{index}] ({name}): description must be a string")
    params: Any = next((spec[k] for k in schema_keys if spec.get(k) is not None), EMPTY_PARAMETERS)
    if not isinstance(params, Mapping):
        raise BadToolSpec(f"tools[{index}] ({name}): parameters must be a JSON-schema object")
    return ToolSpec(name, description, params)
