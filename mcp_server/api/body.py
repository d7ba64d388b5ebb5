"""An API request's body: read within `limits.max_request_bytes` (a larger one is refused while it arrives, before
anything parses it), then parsed as one JSON object nested at most `MAX_JSON_DEPTH` levels.

`MAX_JSON_DEPTH = 128`: the deepest parts of a real request are the JSON Schemas of its tools or response_format
(held to 64 levels themselves, inference/text/json_depth.py) wrapped in 4-6 levels of body (`tools[i].function
.parameters`), and tool-call arguments in the message history, which follow those schemas. 128 takes all of that
and stays far below the ~1,000 levels where Python's parser runs out of recursion; a body nested deeper than that
is refused by the same rule, with the same message.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from deepseek_mcp.inference.text.json_depth import nesting_depth
from deepseek_mcp.mcp_server.api.errors import ApiError, invalid

MAX_JSON_DEPTH = 128
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes: by its Content-Length at once, else while it
    arrives (at most `limit` bytes plus one chunk are ever held)."""
    too_large = ApiError(413, f"the request body is larger than this server takes ({limit} bytes, "
                              "limits.max_request_bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def too_deep() -> ApiError:
    return invalid(f"the request body holds JSON nested deeper than {MAX_JSON_DEPTH} levels (objects and arrays "
                   f"inside each other), this server's limit; flatten it")


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's own stack ran out (about 1,000 levels): past the limit too
        raise too_deep() from None
    except ValueError:  # an integer past Python's conversion limit (4,300 digits)
        raise invalid("the request body holds a number with too many digits to read") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    if nesting_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep()
    if _SURROGATE_ESCAPE.search(raw):  # a \ud800-\udfff escape: valid JSON, but text only if paired
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise invalid("the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
                          "its pair): not text; send valid Unicode") from None
    return data
