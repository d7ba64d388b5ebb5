"""Lean JSON Schemas for tools/list: what pydantic generates, minus what costs the agent context and says nothing.

Dropped: `title` keys (pydantic titles every field after its name), `default: null`, the `{type: "null"}` member
of an optional input's union (omitting the field is how a client says "none"; the server's validation is
unchanged), `additionalProperties: true` (the default) and model docstrings inside `$defs`. Output schemas keep
their nulls, written as `type: [T, "null"]`, since results carry them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_NULL = {"type": "null"}


def input_schema(model: type[BaseModel], *, omit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`model`'s validation schema, lean; `omit` leaves properties out of the published schema."""
    schema = _flatten(_lean(model.model_json_schema(by_alias=True), nullable=False))
    for key in omit:
        schema["properties"].pop(key, None)
    return schema


def output_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s serialization schema, lean, without defaults (a result always carries its fields)."""
    return _without_defaults(_flatten(_lean(model.model_json_schema(by_alias=True, mode="serialization"),
                                            nullable=True)))


def _without_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: (v if k in ("enum", "const") else
                {n: _without_defaults(sub) for n, sub in v.items()} if k == "properties" else
                _without_defaults(v))
            for k, v in node.items() if k != "default"}


def _flatten(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline `$defs`; objects below the top-level properties (a message, a tool spec) are published as plain
    `{type: object}`: the field's description gives their shape, and the server still validates them fully
    (and says what is wrong in one line)."""
    defs = schema.pop("$defs", {})
    return _inline(schema, defs, 0)


def _inline(node: Any, defs: dict[str, Any], depth: int) -> Any:
    if isinstance(node, list):
        return [_inline(v, defs, depth) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        node = {**defs[ref[8:]], **{k: v for k, v in node.items() if k != "$ref"}}
    if depth > 0 and ("properties" in node or node.get("type") == "object"):
        kept = {k: node[k] for k in ("description",) if k in node and depth <= 1}
        return {"type": "object", **kept}
    if "enum" in node or "const" in node:  # the values say the type; a const needs no default
        node = {k: v for k, v in node.items() if k not in ("type", "default")}
    if depth > 0:
        node = {k: v for k, v in node.items() if k != "additionalProperties"}  # enforced, not advertised
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and depth > 1:
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, defs, depth + 1) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs, depth)
    members = out.get("anyOf")
    if isinstance(members, list):  # members collapsed to {type: object} are listed once
        members = [m for i, m in enumerate(members) if m not in members[:i]]
        out["anyOf"] = members
        if len(members) == 1:
            del out["anyOf"]
            out = {**members[0], **out}
    return out


def _lean(node: Any, *, nullable: bool, in_defs: bool = False) -> Any:
    if isinstance(node, list):
        return [_lean(v, nullable=nullable) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key == "default" and value is None:
            continue
        if key == "additionalProperties" and value is True:
            continue
        if key == "description" and in_defs:
            continue  # a model's docstring, repeated wherever it is used
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: _lean(sub, nullable=nullable, in_defs=key == "$defs") for name, sub in value.items()}
        else:
            out[key] = _lean(value, nullable=nullable)
    members = out.get("anyOf")
    if isinstance(members, list) and _NULL in members:
        rest = [m for m in members if m != _NULL]
        if nullable and len(rest) == 1 and isinstance(rest[0].get("type"), str):
            del out["anyOf"]
            out = {**rest[0], **out, "type": [rest[0]["type"], "null"]}
        elif not nullable:
            del out["anyOf"]
            out = {**rest[0], **out} if len(rest) == 1 else {"anyOf": rest, **out}
    return out
