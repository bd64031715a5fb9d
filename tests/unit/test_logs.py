"""JSON log lines carry the service's and the handler's context."""

from __future__ import annotations

import io
import logging

import orjson

from shared.infra.logs import JsonFormatter, _ContextFilter, log_context


def test_json_log_lines_carry_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ContextFilter({"service": "uploader"}))
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with log_context(job_id="job-7", partition=3):
            logger.warning("hello %s", "world", extra={"rows": 5})
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert (first["service"], first["job_id"], first["partition"], first["rows"]) == (
        "uploader",
        "job-7",
        3,
        5,
    )
    assert "job_id" not in second
