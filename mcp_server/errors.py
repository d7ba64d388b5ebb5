"""Pydantic validation errors as an agent can act on them: one line per problem, naming the field and the fix.

A union field (a message's `content`, a tool in `tools`, `tool_choice`) makes pydantic report one error per
union member; only the member the input was evidently meant as is kept (the one whose errors lie deeper than
the field itself), and an object whose `type` tag is wrong is reported by that tag alone.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class _Problem:
    path: Loc  # keys and indexes into the input
    union_at: int | None  # len of the path where the first union member tag sat
    member: str | None  # that tag
    type: str
    msg: str
    input: Any


def readable_errors(err: ValidationError, data: Any, model: type[BaseModel] | None = None,
                    what: str = "the arguments") -> str:
    problems = _prune_unions([_resolve(e, data) for e in err.errors(include_url=False)])
    problems = _by_type_tag(problems)
    lines: list[str] = []
    seen: set[str] = set()
    for where, group in _group_unresolved(problems):
        line = f"- {_fmt_path(where)}: {_message(group, model)}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    count = f"{len(lines)} problem{'s' if len(lines) != 1 else ''}"
    return f"invalid {what} ({count}):\n" + "\n".join(lines)


def _resolve(error: Any, data: Any) -> _Problem:
    """Split pydantic's `loc` into the input path and the union member tags (elements that are no key of
    the input at that point)."""
    path: list[str | int] = []
    union_at: int | None = None
    member: str | None = None
    node = data
    loc = error["loc"]
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif i == len(loc) - 1 and isinstance(part, str) and error["type"] in ("missing", "extra_forbidden"):
            path.append(part)  # the missing or unknown key itself
        else:
            if union_at is None:
                union_at, member = len(path), str(part)
    return _Problem(tuple(path), union_at, member, error["type"], error["msg"], error.get("input"))


def _prune_unions(problems: list[_Problem]) -> list[_Problem]:
    """Per union: keep the member whose errors go deeper than the union's own field, with the fewest errors."""
    by_union: dict[Loc, dict[str, list[_Problem]]] = defaultdict(lambda: defaultdict(list))
    for p in problems:
        if p.union_at is not None and p.member is not None:
            by_union[p.path[: p.union_at]][p.member].append(p)
    dropped: set[int] = set()
    for where, members in by_union.items():
        deep = {m: ps for m, ps in members.items() if any(len(p.path) > len(where) for p in ps)}
        if not deep:
            continue
        # the member that got furthest into the input, then the one with the fewest complaints
        best = min(deep, key=lambda m: (-max(len(p.path) for p in deep[m]), len(deep[m])))
        for m, ps in members.items():
            if m != best:
                dropped.update(id(p) for p in ps)
    return [p for p in problems if id(p) not in dropped]


def _by_type_tag(problems: list[_Problem]) -> list[_Problem]:
    """An object whose `type` is wrong (an `image_url` content part) is reported once, by that tag."""
    tagged = {p.path[:-1] for p in problems if p.path and p.path[-1] == "type" and p.type == "literal_error"}
    return [p for p in problems if p.path[:-1] not in tagged or p.path[-1] == "type"]


def _group_unresolved(problems: list[_Problem]) -> list[tuple[Loc, list[_Problem]]]:
    """Problems at the same path (a union none of whose members fit) become one line."""
    groups: dict[Loc, list[_Problem]] = {}
    for p in problems:
        groups.setdefault(p.path, []).append(p)
    return list(groups.items())


def _message(group: list[_Problem], model: type[BaseModel] | None) -> str:
    first = group[0]
    if len(group) > 1:  # a union: say what each member expects
        expected = " or ".join(dict.fromkeys(_clean(p.msg).removeprefix("Input should be ") for p in group))
        return f"Input should be {expected}; got {_show(first.input)}"
    msg = _clean(first.msg)
    if first.type == "extra_forbidden":
        name = first.path[-1] if first.path else "?"
        hint = _did_you_mean(str(name), first.path[:-1], model)
        return f"{msg}: '{name}' is not a field here; remove it{hint}"
    if first.type == "missing":
        return f"{msg}; add '{first.path[-1]}'" if first.path else msg
    if first.type == "literal_error" and first.path and first.path[-1] == "type":
        return f"{msg}; got {_show(first.input)} (only this kind of object is accepted here)"
    if first.type.startswith("value_error") or first.type == "assertion_error":
        return msg
    return f"{msg}; got {_show(first.input)}"


def _did_you_mean(name: str, parent: Loc, model: type[BaseModel] | None) -> str:
    if model is None or parent:
        return ""
    fields = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(name, fields, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (fields: {', '.join(fields)})"


def _clean(msg: str) -> str:
    msg = re.sub(r"a valid dictionary or instance of \w+", "an object", msg)
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt_path(path: Loc) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(arguments)"
