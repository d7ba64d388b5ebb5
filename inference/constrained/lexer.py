"""A JSON lexer over bytes: enough to know where a partial JSON text stands (for the planner)."""

from __future__ import annotations

from dataclasses import dataclass

OUTSIDE, STRING, ESCAPE = 0, 1, 2  # JSON lexer modes


@dataclass(frozen=True)
class Lex:
    """Where a JSON text stands: inside a string (after a backslash)? is that string an object key? Plus the
    open containers (a string of '{' / '[') and the last structural byte seen outside strings."""

    mode: int = OUTSIDE
    stack: str = ""
    key: bool = False
    after: str = ""


_OPEN, _CLOSE, _PUNCT = frozenset(b"{["), frozenset(b"}]"), frozenset(b",:")


def lex_step(lex: Lex, data: bytes) -> Lex:
    mode, stack, key, after = lex.mode, lex.stack, lex.key, lex.after
    for b in data:
        if mode == ESCAPE:
            mode = STRING
        elif mode == STRING:
            if b == 0x5C:
                mode = ESCAPE
            elif b == 0x22:
                mode, after = OUTSIDE, '"'
        elif b == 0x22:
            mode, key = STRING, stack.endswith("{") and after in ("{", ",")
        elif b in _OPEN:
            stack, after = stack + chr(b), chr(b)
        elif b in _CLOSE:
            stack, after = stack[:-1], chr(b)
        elif b in _PUNCT:
            after = chr(b)
    return Lex(mode, stack, key, after)

