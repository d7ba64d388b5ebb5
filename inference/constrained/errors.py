"""The one error of constrained decoding: a request it cannot enforce, raised before generation."""

from __future__ import annotations

import re


class ConstraintError(ValueError):
    """A tool list, tool_choice, schema or response_format that cannot be enforced; raised before generation."""

def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return re.sub(r"^\[[0-9:]+\] \S+: ", "", text)

