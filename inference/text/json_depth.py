"""How deeply a JSON value nests (objects and arrays inside each other), measured without recursion, and the
limit on a tool's or response_format's JSON Schema.

Python's own walkers of JSON (the `json` parser, `jsonschema`, pydantic) recurse once or more per level and hit
the interpreter's recursion limit somewhere between about 100 and 1,000 levels: deeper input then fails with a
RecursionError wherever it happens to be walked first. A named limit, checked once, says what is wrong instead.

`MAX_SCHEMA_DEPTH = 64`: real tool schemas nest 10-20 levels as JSON (each level of `properties` is two: the
`properties` object and the property's schema); 64 is three times that, and well below the ~190 levels where
`jsonschema`'s own schema check runs out of stack (measured: a 100-level `properties` chain, 200 JSON levels).
"""

from __future__ import annotations

from typing import Any

MAX_SCHEMA_DEPTH = 64


def nesting_depth(value: Any, limit: int) -> int:
    """Levels of objects and arrays in `value` (a scalar 0, `[]` 1, `{"a": [1]}` 2), walked level by level;
    the walk stops at `limit + 1` (anything past the limit is past it)."""
    depth = 0
    level = [value] if isinstance(value, (dict, list)) else []
    while level and depth <= limit:
        depth += 1
        below: list[Any] = []
        for node in level:
            below.extend(v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (dict, list)))
        level = below
    return depth


def schema_depth_error(schema: Any, where: str) -> str | None:
    """None for a schema within MAX_SCHEMA_DEPTH, else the message that says so (`where` names the schema)."""
    if nesting_depth(schema, MAX_SCHEMA_DEPTH) <= MAX_SCHEMA_DEPTH:
        return None
    return (f"{where}: the JSON Schema is JSON nested deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays "
            f"inside each other), this server's limit for a schema; flatten it, e.g. move repeated parts to "
            f"$defs and point at them with $ref")
