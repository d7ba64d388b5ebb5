"""JSON-Schema checks for constrained decoding: refuse what the grammar cannot enforce, tighten formats
into patterns, and size the shortest instance of a schema (for the token budget)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.numbers import bound_numbers
from deepseek_mcp.inference.text.json_depth import schema_depth_error
from deepseek_mcp.inference.text.tools import BadToolSpec, ToolSpec, normalize_tools, schema_error

SEPARATORS = (",", ":")  # compact JSON: json.dumps(..., separators=(",", ":"))


# Keywords the grammar engine ignores (its output would then fail validation), so we refuse them up front.
_UNSUPPORTED = {
    "not": "'not'", "if": "'if'/'then'/'else'", "then": "'if'/'then'/'else'", "else": "'if'/'then'/'else'",
    "dependentRequired": "'dependentRequired'", "dependentSchemas": "'dependentSchemas'",
    "dependencies": "'dependencies'", "contains": "'contains'", "minContains": "'minContains'",
    "maxContains": "'maxContains'",
    "$dynamicRef": "'$dynamicRef'", "$recursiveRef": "'$recursiveRef'",
}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties",
                  "unevaluatedItems", "not", "if", "then", "else", "contains", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_REGEX_UNSUPPORTED = re.compile(r"\(\?[=!<]|\\[1-9]|\\k<")


def check_schema(schema: Any, where: str, *, want_object: bool) -> dict[str, Any]:
    """Validate a JSON Schema and refuse what the grammar cannot enforce. Returns the schema to compile."""
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"{where}: the schema must be a JSON object, got {type(schema).__name__}")
    schema = dict(schema)
    too_deep = schema_depth_error(schema, where)
    if too_deep:
        raise ConstraintError(too_deep)
    error = schema_error(schema)
    if error:
        raise ConstraintError(f"{where}: not a valid JSON Schema at {error}")
    if want_object:
        kind = schema.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and kind == ["object"]):
            raise ConstraintError(f"{where}: tool arguments must be a JSON object; the schema has type {kind!r}")
        schema.setdefault("type", "object")
    _walk(schema, where, "#")
    return _tighten(schema, where)


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"  # days 29-31 left out: always a real date
# Formats the grammar engine generates too loosely for a validator (leading zeros, Feb 30) or ignores: the
# grammar gets a pattern or a format that yields a subset of the valid strings. Validation is unchanged.
_FORMAT_SUBSETS: dict[str, dict[str, str]] = {
    "ipv4": {"pattern": rf"^({_OCTET}[.]){{3}}{_OCTET}$"},
    "date": {"pattern": f"^{_DATE}$"},
    "date-time": {"pattern": rf"^{_DATE}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]{{1,6}})?"
                             r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"},
    "idn-email": {"format": "email"},
    "idn-hostname": {"format": "hostname"},
    "iri": {"format": "uri"},
    "iri-reference": {"format": "uri-reference"},
    "regex": {"pattern": r"^[A-Za-z0-9 _-]*$"},  # literal text is a valid regex
}


def optional_groups(regex: str) -> str:
    """Rewrite each optional group `(...)?` as `(...){0,1}`: xgrammar 0.2.8 turns `(a[0-9]*)?b` into a grammar
    that also takes "5b" (the group's first element becomes optional on its own); `{0,1}` converts right."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            out.append(regex[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if regex[i + 1:i + 2] == "]":  # a leading ']' is a literal inside the class
                out.append("[]")
                i += 2
                continue
        elif c == ")" and regex[i + 1:i + 2] == "?":
            out.append("){0,1}")
            i += 3 if regex[i + 2:i + 3] in ("?", "+") else 2  # a lazy/possessive mark changes nothing here
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _tighten(node: Any, where: str, path: str = "#") -> Any:
    """Copy of a schema for the grammar: _FORMAT_SUBSETS applied, optional regex groups rewritten, numbers
    bounded (numbers.bound_numbers)."""
    if isinstance(node, list):
        return [_tighten(n, where, f"{path}/{i}") for i, n in enumerate(node)]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in ("enum", "const", "default", "examples"):
            out[k] = v
        elif k == "pattern" and isinstance(v, str):
            out[k] = optional_groups(v)
        elif k == "patternProperties" and isinstance(v, Mapping):
            out[k] = {optional_groups(p): _tighten(sub, where, f"{path}/{k}/{p}") for p, sub in v.items()}
        else:
            out[k] = _tighten(v, where, f"{path}/{k}")
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in _FORMAT_SUBSETS and "pattern" not in out:
        del out["format"]
        out.update(_FORMAT_SUBSETS[fmt])
        if "pattern" in out:
            out["pattern"] = optional_groups(out["pattern"])
    return bound_numbers(out, path, where)


def _walk(node: Any, where: str, path: str) -> None:
    if not isinstance(node, Mapping):  # incl. boolean sub-schemas ("items": false only forbids; xgrammar has it)
        return
    for key, what in _UNSUPPORTED.items():
        if key in node:
            raise ConstraintError(f"{where}: {what} at {path} is not supported by constrained decoding; "
                                  "rewrite the schema without it")
    if "multipleOf" in node and not (node.get("type") == "integer" and isinstance(node["multipleOf"], int)):
        raise ConstraintError(f"{where}: 'multipleOf' at {path} is only supported with an integer divisor on "
                              "\"type\": \"integer\"")
    names_schema = node.get("propertyNames")
    if isinstance(names_schema, Mapping) and set(names_schema) - {"pattern", "type"}:
        raise ConstraintError(f"{where}: 'propertyNames' at {path} supports only 'pattern'")
    if node.get("uniqueItems") is True:
        raise ConstraintError(f"{where}: 'uniqueItems' at {path} is not supported by constrained decoding")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise ConstraintError(f"{where}: 'allOf' with several schemas at {path} is not supported by "
                              "constrained decoding; merge them into one schema")
    ref = node.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        raise ConstraintError(f"{where}: $ref {ref!r} at {path} is not a local reference (#/...)")
    props = node.get("properties")
    names = props if isinstance(props, Mapping) else {}
    missing = [k for k in node.get("required", ()) if isinstance(k, str) and k not in names]
    if missing and node.get("type", "object") == "object":
        raise ConstraintError(f"{where}: required propert{'ies' if len(missing) > 1 else 'y'} "
                              f"{', '.join(map(repr, missing))} at {path} not defined in 'properties'; "
                              "constrained decoding only generates declared properties")
    pattern = node.get("pattern")
    if isinstance(pattern, str) and _REGEX_UNSUPPORTED.search(pattern):
        raise ConstraintError(f"{where}: pattern {pattern!r} at {path} uses lookaround or backreferences, "
                              "which constrained decoding cannot enforce")
    for key in _SUBSCHEMA_MAPS:
        sub = node.get(key)
        if isinstance(sub, Mapping):
            for name, s in sub.items():
                _walk(s, where, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_ONE:
        if key in node:
            _walk(node[key], where, f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        sub = node.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                _walk(s, where, f"{path}/{key}/{i}")


# Shortest instance (bytes) of formats as our grammar writes them; patterns get a generous guess.
_FORMAT_BYTES = {"date": 10, "date-time": 20, "time": 9, "email": 3, "idn-email": 3, "uuid": 36, "ipv4": 7,
                 "ipv6": 2, "hostname": 1, "uri": 3, "uri-reference": 1, "duration": 4}
_PATTERN_BYTES = 48
_BIG = 1 << 20


def commit_cost(schema: Mapping[str, Any]) -> int:
    """Upper estimate (bytes, so also tokens) of how much one decision can add to the shortest completion:
    adding an optional property or an array item, or taking a longer anyOf branch. The processor verifies
    structural tokens against the budget while the remaining budget is within this distance of the plan."""
    worst = 0

    def visit(node: Any, depth: int) -> None:
        nonlocal worst
        if not isinstance(node, Mapping) or depth > 64:
            return
        props = node.get("properties") if isinstance(node.get("properties"), Mapping) else {}
        required = set(node.get("required", ()))
        for key, sub in props.items():
            if key not in required:
                worst = max(worst, len(json.dumps(key, ensure_ascii=False).encode()) + 2 + min_bytes(sub, schema))
        for key in ("additionalProperties", "unevaluatedProperties"):
            if isinstance(node.get(key), Mapping):
                worst = max(worst, 4 + min_bytes(node[key], schema))
        if isinstance(node.get("patternProperties"), Mapping):
            for sub in node["patternProperties"].values():
                worst = max(worst, _PATTERN_BYTES + 2 + min_bytes(sub, schema))
        for key in ("items", "additionalItems"):
            if isinstance(node.get(key), Mapping):
                worst = max(worst, 1 + min_bytes(node[key], schema))
        for key in ("prefixItems", "anyOf", "oneOf"):
            for sub in node.get(key) or ():
                worst = max(worst, 1 + min_bytes(sub, schema))
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), Mapping):
                for sub in node[key].values():
                    visit(sub, depth + 1)
        for key in _SUBSCHEMA_ONE:
            visit(node.get(key), depth + 1)
        for key in _SUBSCHEMA_LISTS:
            for sub in node.get(key) or ():
                visit(sub, depth + 1)

    visit(schema, 0)
    return min(worst, 4096)


def min_bytes(node: Any, root: Mapping[str, Any], seen: frozenset[str] = frozenset()) -> int:
    """Rough size in bytes of the shortest compact instance of a schema (over- rather than under-estimated)."""
    if node is True or not isinstance(node, Mapping):
        return 1 if node is not False else _BIG
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        if ref in seen:
            return _BIG
        target: Any = root
        for part in ref[2:].split("/") if ref != "#" else ():
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, Mapping) else {}
        return min_bytes(target, root, seen | {ref})
    if "const" in node:
        return len(canonical(node["const"]).encode())
    if isinstance(node.get("enum"), list) and node["enum"]:
        return min(len(canonical(v).encode()) for v in node["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and node[key]:
            return min(min_bytes(s, root, seen) for s in node[key])
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1:
        return min_bytes(node["allOf"][0], root, seen)
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    return min(_min_typed(k, node, root, seen) for k in kinds)


def _min_typed(kind: Any, node: Mapping[str, Any], root: Mapping[str, Any], seen: frozenset[str]) -> int:
    if kind == "string":
        if "pattern" in node:
            return 2 + _PATTERN_BYTES
        if node.get("format") in _FORMAT_BYTES:
            return 2 + _FORMAT_BYTES[node["format"]]
        return 2 + 4 * int(node.get("minLength", 0))  # up to 4 bytes a character
    if kind in ("integer", "number"):
        bound = node.get("minimum", node.get("exclusiveMinimum", 0))
        return 2 + len(str(abs(bound))) if isinstance(bound, (int, float)) else 24
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "array":
        items = node.get("items") if isinstance(node.get("items"), Mapping) else {}
        prefix = node.get("prefixItems") or []
        n = int(node.get("minItems", 0))
        size = 2 + sum(1 + min_bytes(s, root, seen) for s in prefix[:n])
        return size + max(0, n - len(prefix)) * (1 + min_bytes(items, root, seen))
    if kind == "object" or kind is None and ("properties" in node or "required" in node):
        props = node.get("properties") if isinstance(node.get("properties"), Mapping) else {}
        size = 2 + sum(len(k.encode()) + 4 + min_bytes(props.get(k, {}), root, seen)
                       for k in node.get("required", ()) if isinstance(k, str))
        extra = max(0, int(node.get("minProperties", 0)) - len(node.get("required", ())))
        return size + extra * (6 + min_bytes(node.get("additionalProperties", {}), root, seen))
    return 1


_SIZE_KEYWORDS = ("minLength", "minItems", "minProperties")


def size_keywords(schema: Any, path: str = "#", depth: int = 0) -> list[tuple[str, str, Any, Any]]:
    """(path, keyword, value, node) of every keyword that forces a long shortest instance (minLength, minItems,
    minProperties above 8), for naming what a refused budget is spent on."""
    if not isinstance(schema, Mapping) or depth > 32:
        return []
    found = [(path, k, schema[k], schema) for k in _SIZE_KEYWORDS
             if isinstance(schema.get(k), int) and schema[k] > 8]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), Mapping):
            for name, sub in schema[key].items():
                found += size_keywords(sub, f"{path}/{key}/{name}", depth + 1)
    for key in _SUBSCHEMA_ONE:
        found += size_keywords(schema.get(key), f"{path}/{key}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            found += size_keywords(sub, f"{path}/{key}/{i}", depth + 1)
    return found


def constrained_tools(tools: Sequence[Any]) -> list[ToolSpec]:
    """The tools (any shape `normalize_tools` takes) with their parameters checked and tightened for the
    grammar. Raises ConstraintError naming the tool."""
    try:
        specs = normalize_tools(tools, check_names=True)
    except BadToolSpec as e:
        raise ConstraintError(str(e)) from None
    return [replace(s, parameters=check_schema(s.parameters, f"tool {s.name!r}", want_object=True)) for s in specs]


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=SEPARATORS, ensure_ascii=False)
