"""The named nesting limits (issue 22, item 1): a request body nests at most MAX_JSON_DEPTH levels, a tool's or
response_format's JSON Schema at most MAX_SCHEMA_DEPTH; one level more is refused with a message naming the
limit, and the depth is measured without recursion (a value 100,000 levels deep is measured, not a
RecursionError). The live routes' error shapes are in test_api_openai.py."""

from __future__ import annotations

from typing import Any

import pytest

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.schema import check_schema, constrained_tools
from deepseek_mcp.inference.text.json_depth import MAX_SCHEMA_DEPTH, nesting_depth
from deepseek_mcp.inference.text.tools import BadToolSpec, normalize_tools
from deepseek_mcp.mcp_server.api.body import MAX_JSON_DEPTH, parse_object
from deepseek_mcp.mcp_server.api.errors import ApiError


def nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def deep_schema(depth: int) -> dict[str, Any]:
    """An object schema exactly `depth` JSON levels deep (a property chain; each link is two levels)."""
    leaf: dict[str, Any] = {"type": "string"} if depth % 2 else {"type": "string", "enum": ["x"]}
    schema = leaf
    for _ in range((depth - 1) // 2 if depth % 2 else (depth - 2) // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    assert nesting_depth(schema, 10_000) == depth
    return schema


def test_nesting_depth_counts_levels_without_recursion() -> None:
    assert nesting_depth(5, 10) == 0 and nesting_depth("[[[", 10) == 0
    assert nesting_depth([], 10) == 1 and nesting_depth({"a": [1, {"b": {}}]}, 10) == 4
    assert nesting_depth([[], [[[]]], {"a": [[]]}], 10) == 4
    deep = nested_lists(100_000)  # far past the interpreter's recursion limit
    assert nesting_depth(deep, 200_000) == 100_000
    assert nesting_depth(deep, 128) == 129  # the walk stops one level past the limit


def test_a_body_one_level_past_the_limit_is_refused_naming_it() -> None:
    def body(depth: int) -> bytes:  # an object whose field nests: depth levels in all
        return b'{"model": "m", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert nesting_depth(parse_object(body(MAX_JSON_DEPTH)), 1000) == MAX_JSON_DEPTH
    for raw in (body(MAX_JSON_DEPTH + 1), body(5000), b"[" * 100_000 + b"]" * 100_000,
                b'{"a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001):
        with pytest.raises(ApiError) as info:
            parse_object(raw)
        assert info.value.status == 400 and info.value.code == "invalid_request"
        assert f"JSON nested deeper than {MAX_JSON_DEPTH} levels" in info.value.message, info.value.message
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_object(b'{"a": [}')


def test_a_schema_one_level_past_the_limit_is_refused_naming_it() -> None:
    ok, deep = deep_schema(MAX_SCHEMA_DEPTH), deep_schema(MAX_SCHEMA_DEPTH + 1)
    tool = {"type": "function", "function": {"name": "deep", "parameters": ok}}
    assert normalize_tools([tool], check_schemas=True)[0].parameters == ok
    assert constrained_tools([tool])[0].name == "deep"
    assert check_schema(ok, "response_format", want_object=False)
    refused = f"nested deeper than {MAX_SCHEMA_DEPTH} levels"
    for schema in (deep, deep_schema(400)):  # 400: jsonschema's own check would run out of stack
        tool = {"name": "deep", "inputSchema": schema}  # the MCP shape
        with pytest.raises(BadToolSpec, match=refused) as info:
            normalize_tools([tool], check_schemas=True)
        assert str(info.value).startswith("tools[0] ('deep'): ")
        with pytest.raises(ConstraintError, match=refused) as c:
            constrained_tools([tool])
        assert str(c.value).startswith("tool 'deep': ")
        with pytest.raises(ConstraintError, match=refused):
            check_schema(schema, "response_format", want_object=False)
