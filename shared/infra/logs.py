"""Logging for every layer: a context added to each record, and the set-up entry points call
(JSON lines when stderr is not a terminal, text when it is).

Only entry points (the service runtime, the CLI) call :func:`configure`. Context (service, topic,
partition, offset, job_id) is carried in a contextvar and added to every record by a filter.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "espbridge_log_context", default=None
)

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (job_id=…, topic=…) to every log record emitted inside the block."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self._static = static

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in {**self._static, **(_context.get() or {})}.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, context fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith("_") and k != "service"
        )
        return f"{base} {extras}" if extras else base


class LogSettings(BaseSettings):
    """Log level and format (``auto`` = JSON unless stderr is a terminal)."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_LOG_", frozen=True, extra="ignore")

    level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    format: str = Field(default="auto", pattern=r"^(auto|json|text)$")


def configure(service: str, level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger for an entry point (call once, from ``__main__``)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(service)s %(name)s: %(message)s"))
    handler.addFilter(_ContextFilter({"service": service}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO (every rebalance step); keep their warnings.
    for noisy in ("aiokafka", "asyncssh", "faststream"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
