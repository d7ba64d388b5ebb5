"""JSON with finite numbers only: what a client can rely on after `json.dumps(value, allow_nan=False)`.

Python's `json` parses `NaN`, `Infinity` and `-Infinity` literals and turns a number that overflows a double
(`1e999`) into inf; `jsonschema` then accepts inf against `{"type": "number"}` and serialization writes
`Infinity` (or `null` through pydantic). Here each of those is an error naming the literal.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

_MAX = sys.float_info.max


class NonFiniteNumber(ValueError):
    """A JSON number that is not a finite double; the message quotes it."""


def _constant(name: str) -> Any:
    raise NonFiniteNumber(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteNumber(f"{text[:40]} overflows a double")
    return value


def _int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX:
        raise NonFiniteNumber(f"{text[:40]}{'...' if len(text) > 40 else ''} overflows a double")
    return value


def loads_finite(text: str) -> Any:
    """`json.loads` that raises NonFiniteNumber for NaN/Infinity literals and numbers beyond a double's range
    (json.JSONDecodeError for text that is not JSON)."""
    return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)


def non_finite(value: Any, path: str = "") -> str | None:
    """'path: why' of the first non-finite number inside an already parsed value, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path or '(root)'}: {value} is not a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX:
        return f"{path or '(root)'}: an integer of {len(str(abs(value)))} digits overflows a double"
    if isinstance(value, dict):
        for k, v in value.items():
            found = non_finite(v, f"{path}/{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = non_finite(v, f"{path}/{i}" if path else str(i))
            if found:
                return found
    return None
