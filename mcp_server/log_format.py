"""The server's stderr log: text lines, or one JSON object per line (`--log-format json`) for log shippers.

A record may carry structured fields (`log.info(..., extra={"fields": {...}})`, e.g. each request's token counts
and timings): the JSON form puts them beside the message as keys of their own; the text form has them in the
message already. Never stdout: over stdio it carries the protocol."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...fields}`; an exception's traceback as `exc_info` (one string)."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"time": f"{created}.{int(record.msecs):03d}Z", "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
