"""JSON-lines logging to stderr, configured only by the entry point."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        extra = {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}
        if record.exc_info:
            extra["exc"] = self.formatException(record.exc_info)
        line = {"ts": moment, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        return orjson.dumps({**line, **extra}, default=str).decode()


def configure(level: str) -> None:
    """Send every record at ``level`` and above to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
